"""SFD's optional EMA of the student's weights: the recurrence after every optimizer step, swapped in and
out, and kept across a resume."""

from __future__ import annotations

import pytest
import torch

from kdistpp.sfd import MLPDenoiser, SFDConfig, SFDTrainer

CONFIG = dict(num_steps=4, sigma_min=0.01, sigma_max=20.0, batch_size=16, lr=1e-2, iterations=3)


def trainer(ema=0.8):
    torch.manual_seed(0)
    teacher = MLPDenoiser(2, hidden=16, depth=1, sigma_data=1.0).requires_grad_(False)
    student = MLPDenoiser(2, hidden=16, depth=1, sigma_data=1.0)  # not the teacher: there is something to learn
    return SFDTrainer(student, teacher, SFDConfig(**CONFIG), shape=(2,), ema=ema)


def test_ema_follows_every_optimizer_step_and_swaps_in_and_out():
    t = trainer()
    snapshots = [{k: v.clone() for k, v in t.student.state_dict().items()}]
    step = t.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        snapshots.append({k: v.clone() for k, v in t.student.state_dict().items()})
        return out

    t.optimizer.step = recording_step
    t.fit(progress=False)
    assert len(snapshots) == 1 + 3 * 3  # N - 1 = 3 optimizer steps per batch
    expected = dict(snapshots[0])
    for weights in snapshots[1:]:  # the recurrence, computed here from the recorded weights
        expected = {k: 0.8 * expected[k] + 0.2 * weights[k] for k in expected}
    final = {k: v.clone() for k, v in t.student.state_dict().items()}
    with t.ema_weights() as student:
        for k, v in student.state_dict().items():
            assert torch.allclose(v, expected[k], atol=1e-6), k
        assert not all(torch.equal(v, final[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, final[k]) for k, v in t.student.state_dict().items())  # restored


def test_ema_survives_a_resume(tmp_path):
    whole = trainer()
    whole.fit(progress=False)
    first = trainer()
    first.fit(2, progress=False)
    first.save(str(tmp_path / "ckpt.pt"))
    resumed = trainer().load(str(tmp_path / "ckpt.pt"))
    resumed.fit(progress=False)
    for name in whole.ema:
        assert torch.equal(resumed.ema[name], whole.ema[name]), name
    with pytest.raises(ValueError, match="disagree on EMA"):
        trainer(ema=None).load(str(tmp_path / "ckpt.pt"))
    with pytest.raises(ValueError, match="ema must be a decay"):
        trainer(ema=1.0)
