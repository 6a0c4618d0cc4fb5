"""The A1111 webui's page in a real browser: `webui.py` (gradio) started as its launcher starts it, on CPU,
on tiny random checkpoints, with this repository cloned into extensions/, rendered by headless Chromium and
driven as a user drives it.

What a user sees is compared with what the test set up (the checkpoint files it wrote, the sampler it
picked): the Distillation++ panel shows only while a '... Distillation++' sampler is picked, its teacher
menu lists the webui's checkpoints, and Generate puts an image in the gallery whose infotext carries the
panel's settings. With KDISTPP_SCREENSHOTS=<folder> the same runs save the docs' screenshots.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.request

import pytest

import browser
from hosts import require, webui_data_dir

PANEL = "script_txt2img_distillation_kdistpp_panel"
TEACHER = "script_txt2img_distillation_kdistpp_teacher"
CFG = "script_txt2img_distillation_kdistpp_cfg"
CHECKPOINTS = {"student": 1, "teacher": 2}  # file name -> seed of its UNet


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    import a1111_host

    if not os.environ.get("KDISTPP_A1111"):
        pytest.skip("KDISTPP_A1111 is not set: the webui page tests need an A1111 1.10.1 tree")
    root = a1111_host.a1111_root()
    if root is None:
        pytest.skip(f"KDISTPP_A1111={os.environ['KDISTPP_A1111']} is not an A1111 tree (no modules/)")
    if not (a1111_host.TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"the SD1 tokenizer files the tiny CLIP uses are not at {a1111_host.TOKENIZER} (set KDISTPP_FORGE)")
    require("A1111", ".venv-a1111", "gradio", "ldm.models.diffusion.ddpm", "transformers")
    browser.require_browser()
    tmp = tmp_path_factory.mktemp("a1111-page")
    data = webui_data_dir(tmp, {"sd_checkpoints_limit": 2, "sd_checkpoint_cache": 0,
                                "sd_model_checkpoint": "student.safetensors"})
    a1111_host.tiny_clip(tmp / "clip")
    models = data / "models" / "Stable-diffusion"
    a1111_host.make_checkpoints(models, tmp / "clip", CHECKPOINTS)
    url, process, log = browser.start_webui(root, data, tmp)
    try:
        yield {"url": url, "data": data, "models": models, "log": log}
    finally:
        browser.stop(process)


@pytest.fixture(scope="module")
def driver(webui):
    with browser.chromium(1400, 2000) as driver:  # tall: the whole panel and the results in view
        yield driver


def open_page(driver, webui) -> None:
    from selenium.webdriver.common.by import By

    driver.get(webui["url"])
    browser.wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#txt2img_sampling input"), 90,
                     "the webui's txt2img tab")


def visible(driver, elem_id: str) -> bool:
    return driver.execute_script("const e = document.getElementById(arguments[0]);"
                                 "return !!e && e.offsetParent !== null && e.getBoundingClientRect().height > 0",
                                 elem_id)


def rect(driver, elem_id: str) -> dict:
    return driver.execute_script("return document.getElementById(arguments[0]).getBoundingClientRect().toJSON()",
                                 elem_id)


def dropdown_choices(driver, elem_id: str) -> list[str]:
    """Opens a gradio dropdown and reads its menu."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    return browser.wait_for(driver, lambda d: d.execute_script(
        "const l = [...document.querySelectorAll(`#${arguments[0]} ul.options li`)].map(li => li.dataset.value);"
        "return l.length ? l : null", elem_id), 10, f"the menu of #{elem_id}")


def pick(driver, elem_id: str, value: str) -> None:
    """Picks `value` in a gradio dropdown as a user does: open the menu, click the entry."""
    dropdown_choices(driver, elem_id)
    item = driver.execute_script("return [...document.querySelectorAll(`#${arguments[0]} ul.options li`)]"
                                 ".find(li => li.dataset.value === arguments[1])", elem_id, value)
    assert item is not None, f"{value!r} not in the menu of #{elem_id}"
    item.click()
    browser.wait_for(driver, lambda d: d.execute_script(
        "return document.querySelector(`#${arguments[0]} input`).value", elem_id) == value, 10,
        f"{value!r} picked in #{elem_id}")


def type_number(driver, elem_id: str, value) -> None:
    """Types into the number box of a gradio slider or number field, then leaves it (gradio reads it on change)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def distpp_samplers(driver) -> list[str]:
    return [name for name in dropdown_choices(driver, "txt2img_sampling") if name.endswith(" Distillation++")]


def checkpoint_files(models) -> dict[str, str]:
    """The checkpoint files the test wrote: {file name: first 10 hex digits of its sha256}."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:10] for path in models.glob("*.safetensors")}


def same_checkpoints(tiles: list[str], files: dict[str, str]) -> bool:
    """The webui names a checkpoint 'file.safetensors', with ' [short sha256]' once it has hashed it (at load)."""
    named = {}
    for tile in tiles:
        name, _, digest = tile.partition(" [")
        named[name] = digest.rstrip("]") or None
    return named.keys() == files.keys() and all(d in (None, files[n]) for n, d in named.items())


def test_the_panel_shows_only_while_a_distillation_sampler_is_picked(webui, driver):
    from kdistpp.registry import REGISTRY

    open_page(driver, webui)
    assert not visible(driver, PANEL)  # the page opens on the webui's default sampler
    samplers = distpp_samplers(driver)
    assert samplers == [f"{entry.label}" for entry in REGISTRY]
    for name in samplers:
        pick(driver, "txt2img_sampling", name)
        browser.wait_for(driver, lambda d: visible(d, PANEL), 10, f"the panel with {name}")
        pick(driver, "txt2img_sampling", "Euler")
        browser.wait_for(driver, lambda d: not visible(d, PANEL), 10, "the panel hidden with Euler")


def test_the_teacher_menu_lists_the_checkpoints(webui, driver):
    from kdistpp.integrations import webui_teachers

    open_page(driver, webui)
    pick(driver, "txt2img_sampling", "Euler Distillation++")
    browser.wait_for(driver, lambda d: visible(d, PANEL), 10, "the panel")
    driver.execute_script(f"document.querySelector('#{PANEL} .label-wrap').click()")  # open the accordion
    browser.wait_for(driver, lambda d: visible(d, TEACHER), 10, "the teacher menu in the opened panel")
    choices = dropdown_choices(driver, TEACHER)
    assert choices[:2] == ["None", webui_teachers.SAME_CHECKPOINT]
    assert same_checkpoints(choices[2:], checkpoint_files(webui["models"])), choices


def test_generate_with_a_teacher_shows_the_image_and_its_settings(webui, driver):
    open_page(driver, webui)
    pick(driver, "txt2img_sampling", "Euler Distillation++")
    browser.wait_for(driver, lambda d: visible(d, PANEL), 10, "the panel")
    driver.execute_script(f"document.querySelector('#{PANEL} .label-wrap').click()")
    browser.wait_for(driver, lambda d: visible(d, TEACHER), 10, "the teacher menu in the opened panel")
    teacher = next(tile for tile in dropdown_choices(driver, TEACHER) if tile.startswith("teacher.safetensors"))
    pick(driver, TEACHER, teacher)
    # a small, short image: the tiny models are quick, but the webui's 512 px and 20 steps are not on two cores
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 4)):
        type_number(driver, elem_id, value)
    driver.find_element("css selector", "#txt2img_prompt textarea").send_keys("a red cube")
    # the teacher CFG opens on Auto, and the page says what Auto is
    cfg_text = driver.execute_script(f"return document.querySelector('#{CFG}').innerText")
    assert "Teacher CFG scale (0 = Auto)" in cfg_text and "1 for Flux (dev, schnell)" in cfg_text, cfg_text
    assert driver.find_element("css selector", f"#{CFG} input[type=number]").get_attribute("value") == "0"
    browser.screenshot(driver, "webui_panel", browser.union(rect(driver, PANEL), rect(driver, "txt2img_sampling")))

    driver.find_element("css selector", "#txt2img_generate").click()
    image = browser.wait_for(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#txt2img_gallery img')].find(i => i.complete && i.naturalWidth > 0)"
        " ?? null"), 240, "the generated image in the gallery")
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [64, 64]
    # the gallery shows the file the webui saved
    with urllib.request.urlopen(image.get_attribute("src"), timeout=30) as answer:
        shown = answer.read()
    saved = list((webui["data"] / "outputs" / "txt2img-images").rglob("*.png"))
    assert [path for path in saved if path.read_bytes() == shown], "the gallery's image is none of the saved files"
    from PIL import Image

    assert Image.open(io.BytesIO(shown)).size == (64, 64)
    # the panel's settings reached the generation: they are in the image's infotext under the page
    info = browser.wait_for(driver, lambda d: d.execute_script(
        "return document.querySelector('#html_info_txt2img')?.innerText || null"), 30, "the infotext")
    assert "Sampler: Euler Distillation++" in info, info
    assert f"DistillationPP teacher: {teacher}" in info and "DistillationPP w: 0.3" in info, info
    assert "DistillationPP teacher CFG: 5.0" in info, info  # Auto, as the SD1 teacher ran it
    time.sleep(0.5)
    browser.screenshot(driver, "webui_generate",
                       browser.union(rect(driver, "txt2img_settings"), rect(driver, "txt2img_results")))
