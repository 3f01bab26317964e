"""The docs' figures against their data: every results block of README.md and docs/*.md is
what ``orchestrator.results_docs`` renders from docs/results/, and the renderers quote the
data's own numbers."""

from __future__ import annotations

import json

from orchestrator import results_docs


def test_every_block_of_the_docs_matches_its_data(capsys):
    assert results_docs.main(["--check"]) == 0, capsys.readouterr().out
    names = {m.group(2) for page in results_docs.pages()
             for m in results_docs.BLOCK.finditer(page.read_text())}  # fmt: skip
    assert {"demo", "noise_budget", "aa_calibration", "time_to_verdict"} <= names


def test_a_stale_block_is_rewritten_from_the_data():
    text = "intro\n<!-- results:noise_budget -->\nold figure\n<!-- /results:noise_budget -->\n"
    new = results_docs.rewrite(text)
    data = json.loads((results_docs.RESULTS / "noise_budget.json").read_text())
    before = data["summary"]["before"]
    assert "old figure" not in new and new.startswith("intro\n<!-- results:noise_budget -->\n")
    assert f"| {before['seed_sd']:.2f} | {before['eval_se']:.2f} |" in new
    assert data["commit"][:7] in new and results_docs.rewrite(new) == new


def test_an_absent_data_file_says_so():
    assert (
        results_docs.render("gpu_packing").startswith("*Not measured here")
        or (results_docs.RESULTS / "gpu_packing.json").is_file()
    )
