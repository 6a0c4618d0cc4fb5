"""ComfyUI's page in a real browser: ComfyUI's own server (main.py --cpu) with this repository as a custom
node, its frontend (comfyui-frontend-package) rendered by headless Chromium and driven as a user drives it.

What a user sees is compared with what the nodes declare (the V3 schemas, as the server's /object_info
gives them to the page) and with the files of example_workflows/: each node (the Distillation++ Sampler and
the Distillation++ Guider) is found by the search box and each of its inputs shows its own tooltip where it
is drawn, and an example workflow opens from the template browser and runs to an image.
With KDISTPP_SCREENSHOTS=<folder> the same runs save the docs' screenshots (tools/screenshots.py).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

import browser
from hosts import REPO, require

NODE_TYPE = "KdistppDistillationPPSampler"
GUIDER_TYPE = "KdistppDistillationPPGuider"
NODE_TYPES = (NODE_TYPE, GUIDER_TYPE)
EXAMPLES = REPO / "example_workflows"

SEARCH_BOX = "input[placeholder='Search Nodes...']"
# The canvas draws the nodes, so where a slot or widget is on the page is computed in the page:
# __toPage(graph point) -> page point; __box(DOMRects and [x, y, w, h] graph boxes) -> [left, top, right, bottom].
TO_PAGE = """
const rect = app.canvas.canvas.getBoundingClientRect(), ratio = app.canvas.canvas.width / rect.width;
window.__toPage = p => {
    const q = app.canvas.ds.convertOffsetToCanvas(p);
    return [q[0] / ratio + rect.left, q[1] / ratio + rect.top];
};
window.__box = items => {
    const c = items.flatMap(b => b.width !== undefined
        ? [[b.left, b.top], [b.right, b.bottom]] : [__toPage([b[0], b[1]]), __toPage([b[0] + b[2], b[1] + b[3]])]);
    return [Math.min(...c.map(p => p[0])), Math.min(...c.map(p => p[1])),
            Math.max(...c.map(p => p[0])), Math.max(...c.map(p => p[1]))];
};
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    browser.require_browser()
    require("ComfyUI", ".venv-comfyui", "comfyui_frontend_package", "requests")  # main.py imports requests
    import comfy_server

    comfy_server.host_root()
    server = comfy_server.start(tmp_path_factory.mktemp("comfy-page"), models=EXAMPLES.is_dir())
    try:
        # a returning user: the page opens the default workflow, not the first-run template dialog
        request = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def driver(server):
    with browser.chromium() as driver:
        yield driver


def open_page(driver, server) -> None:
    """The page as a returning user opens it, without the last test's workflow (the page keeps it in storage)."""
    if driver.current_url.startswith(server.url):
        driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.get(server.url)
    browser.wait_for(driver, lambda d: d.execute_script(
        "return !!(window.app && app.vueAppReady && app.graph && app.canvas && app.canvas.canvas)"), 90,
        "ComfyUI's page ready")


def node_definition(server, node_type: str = NODE_TYPE) -> tuple[dict, dict]:
    """The node's definition as the server gives it to the page (/object_info), and each input's tooltip."""
    info = server.get("/object_info")[node_type]
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    return info, {name: specs[name][1]["tooltip"] for name in order}


def search_and_add(driver, query: str = "Distillation", screenshot: str | None = None) -> list[str]:
    """Double-clicks the empty canvas, types `query` in the search box, picks the first result; returns
    the texts of the results shown."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("app.graph.clear()")  # an empty canvas: a double-click on a node edits it instead
    canvas = driver.find_element(By.CSS_SELECTOR, "canvas#graph-canvas")
    ActionChains(driver).move_to_element_with_offset(canvas, -250, -50).double_click().perform()
    box = browser.wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, SEARCH_BOX), 15,
                           "the node search box (double-click on the canvas)")
    box.send_keys(query)
    # the list re-renders while the search runs: read it in one go, once it shows a match
    results = browser.wait_for(driver, lambda d: d.execute_script(
        "const r = [...document.querySelectorAll('li[role=option]')].map(o => o.innerText.trim()).filter(t => t);"
        "return r.some(t => t.toLowerCase().includes(arguments[0].toLowerCase())) ? r : null", query),
        15, f"search results for {query!r}")
    if screenshot:
        time.sleep(0.5)  # the result's preview of the node
        driver.execute_script(TO_PAGE)
        box = driver.execute_script(
            "const input = document.querySelector(arguments[0]);"
            "const shown = [input.closest('.p-dialog, [role=dialog]') || input.parentElement,"
            "               ...document.querySelectorAll('.comfy-vue-node-preview-container, [role=listbox]')];"
            "return __box(shown.map(e => e.getBoundingClientRect()).filter(r => r.width > 0))", SEARCH_BOX)
        browser.screenshot(driver, screenshot, tuple(box))
    search = driver.find_element(By.CSS_SELECTOR, SEARCH_BOX)
    search.send_keys(Keys.ENTER)
    return results


# the query a user types for each node, and the screenshots its runs save for the docs
QUERIES = {NODE_TYPE: ("Distillation++ Sampler", None, "comfyui_node"),
           GUIDER_TYPE: ("Distillation++ Guider", None, "comfyui_guider_node")}


def test_the_node_search_lists_both_nodes(server, driver):
    open_page(driver, server)
    results = search_and_add(driver, "Distillation", screenshot="comfyui_search")
    for node_type in NODE_TYPES:
        info, _ = node_definition(server, node_type)
        title, category = info["display_name"], info["category"].replace("/", " > ")
        assert any(title in r and category in r and "kdistpp" in r for r in results), (title, results)


@pytest.mark.parametrize("node_type", NODE_TYPES)
def test_the_node_search_finds_the_node_and_adds_it(server, driver, node_type):
    info, _ = node_definition(server, node_type)
    query, screenshot, _ = QUERIES[node_type]
    open_page(driver, server)
    results = search_and_add(driver, query, screenshot=screenshot)
    title, category = info["display_name"], info["category"].replace("/", " > ")
    assert any(title in r and category in r and "kdistpp" in r for r in results), results
    nodes = browser.wait_for(driver, lambda d: d.execute_script(
        "return app.graph.nodes.map(n => [n.type, n.title])") or None, 10, "the added node")
    assert nodes == [[node_type, title]]


@pytest.mark.parametrize("node_type", NODE_TYPES)
def test_the_added_node_shows_each_input_with_its_tooltip(server, driver, node_type):
    info, tooltips = node_definition(server, node_type)
    query, _, screenshot = QUERIES[node_type]
    open_page(driver, server)
    search_and_add(driver, query)
    node_id = browser.wait_for(driver, lambda d: d.execute_script(
        "return app.graph.nodes.find(n => n.type === arguments[0])?.id ?? null", node_type), 10, "the added node")
    driver.execute_script(TO_PAGE)
    # where each input is drawn: its socket, or for a widget input the middle of its widget
    places = driver.execute_script("""
        const node = app.graph.getNodeById(arguments[0]);
        return node.inputs.map((slot, i) => {
            const widget = slot.widget && node.widgets.find(w => w.name === slot.widget.name);
            const at = widget ? [node.pos[0] + node.size[0] / 2, node.pos[1] + (widget.last_y ?? widget.y) + 10]
                              : node.getConnectionPos(true, i);
            return [slot.name, __toPage(at)];
        });""", node_id)
    # every declared input, in the declared order, the page drawing the sockets before the widgets
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    widget = {name: specs[name][0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") for name in tooltips}
    assert [name for name, _ in places] == [n for n in tooltips if not widget[n]] + [n for n in tooltips if widget[n]]

    def tooltip(d):
        shown = d.execute_script("const t = document.querySelector('.node-tooltip');"
                                 "return t && t.offsetParent !== null ? t.innerText : null")
        return shown

    seen = {}
    for name, (x, y) in places:
        browser.hover(driver, x - 400, y)  # off the node: the tooltip goes, the next one is a new one
        browser.wait_for(driver, lambda d: tooltip(d) is None, 10, "the tooltip hidden off the node")
        browser.hover(driver, x, y)
        seen[name] = browser.wait_for(driver, tooltip, 10, f"the tooltip of {name}")
        if name == "w" and screenshot:
            box = driver.execute_script("return __box([app.graph.getNodeById(arguments[0]).getBounding(),"
                                        "document.querySelector('.node-tooltip').getBoundingClientRect()])", node_id)
            browser.screenshot(driver, screenshot, tuple(box))
    assert seen == tooltips

    # the node's title shows the node's description
    x, y = driver.execute_script("const n = app.graph.getNodeById(arguments[0]), h = LiteGraph.NODE_TITLE_HEIGHT;"
                                 "return __toPage([n.pos[0] + 40, n.pos[1] - h / 2])", node_id)
    browser.hover(driver, x - 400, y)
    browser.wait_for(driver, lambda d: tooltip(d) is None, 10, "the tooltip hidden off the node")
    browser.hover(driver, x, y)
    assert browser.wait_for(driver, tooltip, 10, "the title's tooltip") == info["description"]


def example_names() -> list[str]:
    return sorted(path.stem for path in EXAMPLES.glob("*.json"))


def open_templates(driver, server) -> None:
    """The sidebar's Templates button, then this node pack's entry under Extensions."""
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    driver.find_element(By.CSS_SELECTOR, "button.templates-tab-button").click()
    entry = browser.wait_for(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('[role=dialog] nav span')].find(e => e.innerText.trim() === 'kdistpp')"),
        30, "kdistpp under Extensions in the template browser")
    entry.click()


def shown_templates(driver) -> list[str]:
    """The names on the template browser's cards (their test ids are 'template-workflow-<name>')."""
    names = "return [...document.querySelectorAll(arguments[0])].map(e => e.dataset.testid.slice(18))"
    return driver.execute_script(names, "[role=dialog] [data-testid^=template-workflow-]")


def warnings_shown(driver) -> list[str]:
    """The texts of the page's warning and error toasts (a workflow that fails the page's checks, a failed run)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.p-toast-message-warn, .p-toast-message-error')].map(e => e.innerText)")


def load_template(driver, server, name: str) -> None:
    from selenium.webdriver.common.by import By

    open_templates(driver, server)
    selector = f"[data-testid='template-workflow-{name}']"
    card = browser.wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector), 30, f"the card of {name}")
    card.click()
    browser.wait_for(driver, lambda d: d.execute_script(
        "return app.graph.nodes.some(n => arguments[0].includes(n.type)) && !document.querySelector('[role=dialog] "
        "[data-testid^=\"template-workflow-\"]')", list(NODE_TYPES)), 30, f"{name} loaded on the canvas")
    time.sleep(0.5)  # the page checks the workflow as it loads: let a warning show


def test_the_template_browser_lists_the_example_workflows(server, driver):
    names = example_names()
    assert names, "example_workflows/ holds no workflow"
    assert sorted(server.get("/workflow_templates")["kdistpp"]) == names
    open_templates(driver, server)
    browser.wait_for(driver, lambda d: sorted(shown_templates(d)) == names or None, 30,
                     f"the cards of {names}")
    dialog = driver.execute_script("return document.querySelector('[role=dialog]').getBoundingClientRect().toJSON()")
    browser.screenshot(driver, "comfyui_templates", browser.union(dialog), margin=0)


@pytest.mark.parametrize("name", example_names() or ["(none)"])
def test_each_example_workflow_opens_from_the_template_browser(server, driver, name):
    if not EXAMPLES.is_dir():
        pytest.skip("example_workflows/ is absent")
    load_template(driver, server, name)
    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    shown = driver.execute_script("return app.graph.nodes.map(n => [n.id, n.type, n.widgets_values ?? "
                                  "(n.widgets || []).map(w => w.value)])")
    assert sorted((n[0], n[1]) for n in shown) == sorted((n["id"], n["type"]) for n in workflow["nodes"])
    for node in workflow["nodes"]:
        if node["type"] in NODE_TYPES:  # the node's settings as saved, in its widgets
            page = next(n for n in shown if n[0] == node["id"])
            assert page[2] == node["widgets_values"], (name, node["id"])
    assert warnings_shown(driver) == []


def test_an_example_workflow_runs_from_the_page_to_an_image(server, driver):
    name = "sdxl_lightning_distillation_pp"
    if not (EXAMPLES / f"{name}.json").is_file():
        pytest.skip(f"example_workflows/{name}.json is absent")
    load_template(driver, server, name)
    # a small image: the tiny models are fast, but a 1024 px decode on two CPU cores is not
    driver.execute_script("const n = app.graph.nodes.find(n => n.type === 'EmptyLatentImage');"
                          "for (const w of n.widgets) if (w.name === 'width' || w.name === 'height') w.value = 64;")
    save = driver.execute_script("return app.graph.nodes.find(n => n.type === 'SaveImage').id")
    run = "return [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Run')"
    driver.execute_script(run).click()
    image = browser.wait_for(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('img')].find(i => i.src.includes('/api/view?') && i.complete"
        " && i.naturalWidth > 0) ?? null"), 240, "the output image in the page")
    size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [64, 64]
    # the image the page shows is the one SaveImage wrote, and the SaveImage node holds it
    outputs = driver.execute_script("return app.nodeOutputs[String(arguments[0])]?.images ?? null", save)
    assert outputs and len(outputs) == 1
    folder = server.base / outputs[0]["type"] / outputs[0]["subfolder"]
    src = image.get_attribute("src")
    assert f"filename={outputs[0]['filename']}" in src
    with urllib.request.urlopen(src, timeout=30) as answer:
        assert answer.read() == (folder / outputs[0]["filename"]).read_bytes()
    if os.environ.get(browser.SCREENSHOTS):
        # the whole graph, large enough for the canvas to draw its texts (it drops them below ~60 % zoom)
        driver.set_window_size(2600, 1400)
        time.sleep(1)
        driver.execute_script("return app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        time.sleep(1)
        driver.execute_script(TO_PAGE)
        box = driver.execute_script("return __box(app.graph.nodes.map(n => n.getBounding()))")
        browser.screenshot(driver, "comfyui_workflow", tuple(box), margin=20)
        driver.set_window_size(1600, 1000)
    assert warnings_shown(driver) == []
