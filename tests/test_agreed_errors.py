"""Every failure of a multi-process run is agreed (review-3 H5): a failure that one process meets, at each site
where one process could otherwise stop while the others enter a collective (or wait at a barrier), stops both,
within a timeout, and both name it. Two processes of 4 CPU devices each on localhost (`test_multihost`'s job),
with the failure injected into one of them by `tests/fault_child.py`."""

import json
import os
import sys

import pytest

from test_multihost import REPO, run_processes
from vrft_jax import recipe
from vrft_jax import run as runs

TIMEOUT_S = 240


def run_with_failure(site, workdir, data, *extra):
    """(return codes, logs) of the two processes, `site` failing in one (`fault_child.inject`)."""
    fault_child = os.path.join(REPO, "tests", "fault_child.py")
    return run_processes(workdir, data, *extra, timeout=TIMEOUT_S,  # a hang fails there
                         wrap=lambda argv: [sys.executable, fault_child, site, "--", *argv[3:]])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("agreed_data"))
    paths = os.path.join(directory, "train"), os.path.join(directory, "heldout")
    runs.make_synthetic_data(recipe.load(os.path.join(REPO, "tests", "train_recipe.py"),
                                         {"data.path": paths[0], "eval.path": paths[1]}))
    return paths


def tiny_hf_checkpoint(directory) -> str:
    """A Hugging Face directory with the recipe's architecture (its config.json only: the conversion never
    reads further, it fails first)."""
    config = recipe.model_config(recipe.load(os.path.join(REPO, "tests", "train_recipe.py")))
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f)
    return str(directory)


SITES = {  # site: extra train arguments that reach it soonest
    "sft_target": ("--config.mode=sft",),
    "left_padding": (),
    "eval_rewards": ("--config.eval_every=1",),
    "metrics_write": ("--config.eval_every=1",),  # the first row: the evaluation before step 1
    "prepare": (),
    "model_swap": ("--config.mode=sft", "--config.total_steps=1"),  # the swap ends every run; an SFT step is cheaper
    "hf_conversion": (),
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_a_failure_on_one_process_stops_both_naming_it(site, datasets, tmp_path):
    data, heldout = datasets
    extra = [*SITES[site], f"--config.eval.path={heldout}"]
    if site == "prepare":  # a dataset the run must make first, on process 0
        data = str(tmp_path / "fresh" / "train")
    if site == "hf_conversion":
        extra.append(f"--config.model.checkpoint={tiny_hf_checkpoint(tmp_path / 'hf')}")
    codes, logs = run_with_failure(site, str(tmp_path / "run"), data, *extra)
    report = "\n".join(f"--- process {i} (exit {c}) ---\n{log[-2500:]}" for i, (c, log) in enumerate(zip(codes, logs)))
    assert codes[0] != 0 and codes[1] != 0, report
    if site == "left_padding":  # a check every process makes: both raise the same error, naming the row
        for log in logs:
            assert "InputError: generation needs left-padded prompts: rows [4] end in padding" in log, report
        return
    failing = 1 if site in ("sft_target", "left_padding", "eval_rewards") else 0
    message = f"injected failure at {site} on process {failing}"
    assert f"InjectedFailure: {message}" in logs[failing], report
    # the peer's error is the other's whole story: one line (cli.UserError), no traceback of its own
    assert f"error: process {failing} failed: InjectedFailure: {message}" in logs[1 - failing], report
