"""The regression demo (python -m bnn_fast.examples.regression) runs end to end, quickly, with
tiny settings: it trains (the loss goes down) and saves a valid PNG."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnn_fast
from conftest import requires_ext

pytest.importorskip("matplotlib")

from bnn_fast.examples import regression  # noqa: E402  (after the matplotlib check)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def test_main_trains_and_saves_the_figure(tmp_path, capsys):
    out = tmp_path / "fit.png"
    run = regression.main(["--steps", "40", "--samples", "100", "--device", "cpu",
                           "--out", str(out), "--no-progress"])
    assert len(run.losses) == 40
    first, last = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    assert last < first, (first, last)
    assert run.figure == out.resolve()
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    printed = capsys.readouterr().out
    assert "training: 40 steps" in printed and "prediction: 100 samples" in printed
    assert f"figure: {out.resolve()}" in printed
    # Fused where the kernels run (not under BNN_FAST_FORCE_REFERENCE or without the extension).
    fusable = bnn_fast.fusion.plan(regression.make_model(), torch.zeros(1, 1), grad=True) is not None
    assert f"fused training: {'yes' if fusable else 'no'}" in printed


@requires_ext
def test_no_fuse_trains_the_sequential_layer_by_layer(tmp_path, capsys, monkeypatch):
    calls = []
    original = bnn_fast._ops.bayes_mlp
    monkeypatch.setattr(bnn_fast._ops, "bayes_mlp", lambda *a: calls.append(1) or original(*a))
    args = ["--steps", "20", "--samples", "20", "--device", "cpu", "--out", str(tmp_path / "fit.png"),
            "--no-progress"]
    run = regression.main(args + ["--no-fuse"])
    assert calls == [] and "fused training: no" in capsys.readouterr().out
    assert len(run.losses) == 20
    regression.main(args)
    assert len(calls) == 20


def test_module_runs_from_the_command_line_with_the_default_output(tmp_path):
    # The repository on the path, as when the command is run from its root.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, "-m", "bnn_fast.examples.regression", "--steps", "5", "--samples", "20",
         "--device", "cpu", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "regression.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "figure: " in done.stdout


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_each_estimator_trains(tmp_path, estimator, monkeypatch, capsys):
    used = []
    make_model = regression.make_model

    def spy(name):
        model = make_model(name)
        used.extend(m.estimator for m in model if hasattr(m, "estimator"))
        return model

    monkeypatch.setattr(regression, "make_model", spy)
    run = regression.main(["--steps", "40", "--samples", "50", "--device", "cpu", "--estimator",
                           estimator, "--out", str(tmp_path / "fit.png"), "--no-progress"])
    assert used == [estimator, estimator]
    assert "fused training: no" in capsys.readouterr().out  # the fused operator is reparam only
    first, last = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    assert last < first, (first, last)


@pytest.mark.parametrize("argv", [["--estimator", "dropout"], ["--steps", "0"],
                                  ["--samples", "-1"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        regression.parse_args(argv)
    assert exit_info.value.code == 2
