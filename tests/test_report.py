"""benchmarks.report: the README's performance table and REPORT.md are what the committed
results give, and a result that does not say where it was measured is rejected."""
import argparse
import copy
import json
import shutil

import pytest

from benchmarks import harness, report

CPU_RESULT = report.RESULTS_DIR / "kl_cpu.json"


def test_readme_table_is_what_the_committed_results_give():
    text = report.README.read_text()
    begin, end = text.index(report.README_BEGIN), text.index(report.README_END) + len(report.README_END)
    assert text[begin:end] == report.render_readme_table(report.load_results()), (
        "README.md's performance table differs from the results: run python -m benchmarks.report")


def test_report_md_is_what_the_committed_results_give():
    path = report.RESULTS_DIR / report.REPORT_NAME
    assert path.read_text() == report.render_report(report.load_results()), (
        "benchmarks/results/REPORT.md differs from the results: run python -m benchmarks.report")


def test_every_committed_result_names_its_machine_commit_and_date():
    for result in report.load_results():
        machine = result["machine"]
        assert machine["commit"] and machine["date"] and machine["cpu"], result["path"]


def test_the_harness_records_every_key_the_report_requires(monkeypatch):
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", "0")
    info = harness.machine_info(argparse.Namespace(device="cpu"))
    assert set(report.REQUIRED_METADATA) <= set(info)
    assert info["device"] == "cpu" and info["cpu_simd"] == "scalar" and info["commit"]


@pytest.mark.parametrize("key", report.REQUIRED_METADATA)
def test_a_result_without_metadata_is_rejected_naming_file_and_key(tmp_path, key):
    result = json.loads(CPU_RESULT.read_text())
    del result["machine"][key]
    (tmp_path / "kl_cpu.json").write_text(json.dumps(result))
    with pytest.raises(report.MetadataError, match=rf"kl_cpu\.json: machine\.{key} is missing"):
        report.load_results(tmp_path)


def test_a_gpu_result_without_the_gpu_name_is_rejected(tmp_path):
    result = json.loads((report.RESULTS_DIR / "kl_cuda.json").read_text())
    del result["machine"]["gpu"]
    (tmp_path / "kl_cuda.json").write_text(json.dumps(result))
    with pytest.raises(report.MetadataError, match=r"machine\.gpu is missing"):
        report.load_results(tmp_path)


def test_a_json_that_is_not_a_result_is_rejected(tmp_path):
    (tmp_path / "notes.json").write_text(json.dumps({"comment": "hand-written"}))
    with pytest.raises(report.MetadataError, match=r"notes\.json: no 'suite' key"):
        report.load_results(tmp_path)


def test_a_new_suite_appears_in_the_report(tmp_path):
    shutil.copy(CPU_RESULT, tmp_path)
    new = copy.deepcopy(json.loads(CPU_RESULT.read_text()))
    new["suite"] = "contention"
    new["measurements"][0]["label"] = "A new table"
    (tmp_path / "contention_cpu.json").write_text(json.dumps(new))
    text = report.render_report(report.load_results(tmp_path), tmp_path)
    assert "## `contention` on CPU" in text and "### A new table" in text


def test_check_fails_on_a_stale_readme_and_passes_once_regenerated(tmp_path, capsys):
    shutil.copy(CPU_RESULT, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold figures\n{report.README_END}\noutro\n")
    args = ["--results", str(tmp_path), "--readme", str(readme)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    assert report.main(args + ["--check"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old figures" not in text
    assert "KL forward+backward, 10.5M parameters" in text


def test_main_reports_a_result_without_metadata_as_an_error(tmp_path, capsys):
    result = json.loads(CPU_RESULT.read_text())
    del result["machine"]["commit"]
    (tmp_path / "kl_cpu.json").write_text(json.dumps(result))
    assert report.main(["--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]) == 1
    assert "machine.commit is missing" in capsys.readouterr().err
