"""Every command as a new user meets it (issue 20): bad input is one line naming the culprit, a non-zero exit and
no traceback; `--help` exits 0 (and lists the recipes, for the commands that take one); a CPU machine with libtpu
installed hears nothing from it; each hint's program exists in the pinned environment.

The commands run in an empty working directory (no data/, sources/ or checkpoints/), as in a fresh clone."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from vrft_jax import recipe
from vrft_jax.configs import _common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED_STDERR = re.compile(r"^(platform: |error: |\(add --verbose to see where it was raised\)$)")

TRAIN, EVALUATE, AOT = ("-m", "vrft_jax.train"), ("-m", "vrft_jax.evaluate"), ("-m", "vrft_jax.aot")
SCORE, PREPARE = ("-m", "vrft_jax.evaluate", "score"), ("-m", "vrft_jax.data.prepare")
HF_TO_FLAX, FLAX_TO_HF = ("-m", "model_port.hf_to_flax"), ("-m", "model_port.flax_to_hf")


def run(args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the command chooses, as for a user
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**env, **(env_extra or {})})


def write_inputs(directory):
    """The hand-made files the bad invocations read: ground truths and predictions, sources, a dataset."""
    gt = {"images": [{"id": 1, "width": 640, "height": 480}], "categories": [{"id": 1, "name": "bus"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100]}]}
    good = json.dumps({"image_id": 1, "category_id": 1, "completion": "<answer>No Objects</answer>"})
    files = {
        "gt.json": json.dumps(gt),
        "gt_list.json": "[]",
        "gt_negative.json": json.dumps({**gt, "annotations": [{**gt["annotations"][0], "bbox": [10, 10, -5, 100]}]}),
        "gt_string_box.json": json.dumps({**gt, "annotations": [{**gt["annotations"][0], "bbox": "10,10,5,5"}]}),
        "gt_broken.json": '{"images": [',
        "p.jsonl": good + "\n",
        "p_empty.jsonl": "",
        "p_conflict.jsonl": good + "\n" + json.dumps({"image_id": 1, "category_id": 1, "completion": "x"}) + "\n",
        "p_unknown.jsonl": json.dumps({"image_id": 7, "category_id": 1, "completion": "x"}) + "\n",
        "not_a_list.json": '{"image_path": "a.png"}',
        "not.parquet": "hello",
        "sources/ckpt_without_config/model.safetensors": "",
    }
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (directory / "p_latin1.jsonl").write_bytes(b'{"image_id": 1, "category_id": 1, "completion": "caf\xe9"}\n')
    (directory / "data" / "taken" / "1.0.0").mkdir(parents=True)
    (directory / "data" / "taken" / "1.0.0" / "dataset_info.json").write_text("{}")


# (command, arguments, what the error line must say)
BAD = [
    (TRAIN, ["--config=lvis_fewshot"], r"the train dataset data/virft_lvis_few_shot is not there; .*hf download "),
    (TRAIN, ["--config.lr=1"], r"unknown config key 'lr'.*did you mean 'train.learning_rate'"),
    (TRAIN, ["--config=lvis_fewshot", "--config.train.learnin_rate=1e-5"], r"did you mean 'train.learning_rate'"),
    (TRAIN, ["--config=no_such_recipe"], r"no_such_recipe"),
    (TRAIN, ["--config=coco_fewshot:shot=8"], r"unknown recipe argument 'shot'"),
    (TRAIN, ["--config.total_steps=abc"], r"total_steps must be int"),
    (TRAIN, ["--config=lvis_fewshot", "--config.rewards.mode=lax"], r"unknown reward mode 'lax'"),
    (TRAIN, ["--no_such_flag=1"], r"Unknown command line flag 'no_such_flag'"),
    (TRAIN, ["--config=lvis_fewshot", "--config.data.path=data/taken"], r"initial checkpoint "
     r"checkpoints/Qwen2-VL-2B-Instruct is not there.*hf download Qwen/Qwen2-VL-2B-Instruct"),
    (EVALUATE, ["--config=lvis_fewshot"], r"--ckpt must have a value"),
    (EVALUATE, ["--config=lvis_fewshot", "--ckpt=x"],
     r"held-out set data/lvis_val_\S+ is not there; to make it, fetch the sources: LVIS"),
    (AOT, ["--config=lvis_fewshot", "--topology=v4-7"], r"--topology=v4-7"),
    (AOT, ["--config=lvis_fewshot"], r"--topology must have a value"),
    (SCORE, ["--gt", "gt_list.json", "--predictions", "p.jsonl"], r"gt_list.json: expected a COCO .* JSON list"),
    (SCORE, ["--gt", "gt_negative.json", "--predictions", "p.jsonl"], r"gt_negative.json: annotation 0 .*negative"),
    (SCORE, ["--gt", "gt_string_box.json", "--predictions", "p.jsonl"], r"gt_string_box.json: annotation 0 .*bbox"),
    (SCORE, ["--gt", "gt_broken.json", "--predictions", "p.jsonl"], r"gt_broken.json:1:\d+: the ground truth is not"),
    (SCORE, ["--gt", "missing.json", "--predictions", "p.jsonl"], r"missing.json: cannot read the ground truth"),
    (SCORE, ["--gt", "gt.json", "--predictions", "p_latin1.jsonl"], r"p_latin1.jsonl:1: not UTF-8 text"),
    (SCORE, ["--gt", "gt.json", "--predictions", "p_empty.jsonl"], r"p_empty.jsonl: no predictions"),
    (SCORE, ["--gt", "gt.json", "--predictions", "p_conflict.jsonl"], r"p_conflict.jsonl:2: a second, different"),
    (SCORE, ["--gt", "gt.json", "--predictions", "p_unknown.jsonl"], r"p_unknown.jsonl:1: image 7 is not in the"),
    (SCORE, ["--gt", "gt.json", "--predictions", "p.jsonl", "--protocol", "lvis"], r"gt.json is not an LVIS file"),
    (SCORE, ["--gt", "gt.json"], r"required: --predictions"),
    (PREPARE, ["coco", "--output", "data", "--name", "x"], r"required: --annotations, --images"),
    (PREPARE, ["lisa", "--output", "data", "--name", "x"], r"required: --input"),
    (PREPARE, ["virft", "--json", "nope.json", "--output", "data", "--name", "x"], r"--json nope.json: no such file"),
    (PREPARE, ["virft", "--parquet", "a.parquet", "--output", "data", "--name", "x"], r"--parquet a.parquet: no such"),
    (PREPARE, ["virft", "--json", "not_a_list.json", "--output", "data", "--name", "x"],
     r"not_a_list.json: expected a JSON list"),
    (PREPARE, ["synthetic", "--output", "data", "--name", "Bad-Name"], r"--name 'Bad-Name'"),
    (PREPARE, ["synthetic", "--output", "data", "--name", "taken"], r"data/taken/1.0.0 exists"),
    (PREPARE, ["imagenet", "--output", "data", "--name", "x"], r"invalid choice: 'imagenet'"),
    (PREPARE, ["--output", "data", "--name", "x", "synthetic"], r"the source comes first"),
    (PREPARE, ["virft", "--parquet", "not.parquet", "--output", "new_output", "--name", "x"],
     r"--parquet not.parquet: not a parquet file"),  # fails while writing: new_output/ is removed again
    (PREPARE, ["synthetic", "--evaluation", "--output", "data", "--name", "x"], r"unrecognized arguments: --eval"),
    (HF_TO_FLAX, ["--hf", "sources/nope", "--out", "out"], r"--hf sources/nope: no such folder"),
    (HF_TO_FLAX, ["--hf", "sources/ckpt_without_config", "--out", "out"], r"ckpt_without_config: no config.json"),
    (HF_TO_FLAX, ["--hf", "sources", "--out", "out", "--dtype", "int8"], r"--dtype: invalid choice: 'int8'"),
    (FLAX_TO_HF, ["--ckpt", "sources", "--out", "out"], r"--ckpt sources: not a model directory"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fresh_clone")
    write_inputs(directory)
    return directory


@pytest.mark.parametrize("command, args, message", BAD, ids=[f"{c[-1]}:{' '.join(a)}"[:80] for c, a, _ in BAD])
def test_a_bad_invocation_is_one_line_naming_the_culprit(workdir, command, args, message):
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    done = run([*command, *args], workdir)
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines() if not ALLOWED_STDERR.match(line)]
    assert not noise, noise  # no usage text, no libtpu or absl chatter around the one line
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # nothing left behind


def test_verbose_shows_the_traceback_as_well(workdir):
    done = run([*TRAIN, "--config=lvis_fewshot", "--verbose"], workdir)
    assert done.returncode == 2 and "Traceback" in done.stderr and "MissingPathError" in done.stderr


HELP = [(TRAIN, True), (EVALUATE, True), (AOT, True), (SCORE, False), (PREPARE, False),
        ((*PREPARE, "coco"), False), ((*PREPARE, "synthetic"), False), (HF_TO_FLAX, False), (FLAX_TO_HF, False)]


@pytest.mark.parametrize("command, lists_recipes", HELP, ids=[" ".join(c[1:]) for c, _ in HELP])
def test_help_exits_0(workdir, command, lists_recipes):
    done = run([*command, "--help"], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    if lists_recipes:
        for name in recipe.available_recipes():
            assert re.search(rf"^  {name} ", done.stdout, re.M), (name, done.stdout[:3000])
        models = "|".join(_common.MODELS)
        assert f"cls_fewshot     model={models}  dataset=flowers|" in done.stdout
        assert "--config.KEY=VALUE" in done.stdout and "--verbose" in done.stdout
        assert "visual-rft.md" not in done.stdout  # the project's notes are not in a clone
    if command in (EVALUATE, AOT):  # absl's required flags say so in their help
        assert re.search(r"^  --(ckpt|topology): \(required\)", done.stdout, re.M), done.stdout[-2000:]
    if command == PREPARE:  # the global help names the sources; a source's help its own options
        assert all(source in done.stdout for source in ("virft", "coco", "lvis", "classification", "lisa"))
    if command[-1] == "coco":
        assert "--annotations" in done.stdout and "--num-images" not in done.stdout


def test_a_recipes_help_lists_its_fields(workdir):
    done = run([*TRAIN, "--config=lvis_fewshot", "--help"], workdir)
    assert done.returncode == 0 and "fields of lvis_fewshot" in done.stdout
    assert re.search(r"^  train\.learning_rate = ", done.stdout, re.M)


# the train command on a host without accelerators, whatever this one has (JAX's probes answer "none")
AS_ON_A_CPU_HOST = ("-c", "import runpy, sys\nfrom jax._src import hardware_utils as h\n"
                          "h.num_available_tpu_chips_and_device_id = lambda: (0, None)\n"
                          "h.has_visible_nvidia_gpu = lambda: False\n"
                          "sys.argv = ['vrft_jax.train', *sys.argv[1:]]\n"
                          "runpy.run_module('vrft_jax.train', run_name='__main__')")


def test_lvis_fewshot_on_a_cpu_with_libtpu_installed_prints_nothing_of_tpus(workdir):
    """The test extra installs libtpu, which logs TPU_WORKER errors when JAX probes it on a host without a TPU."""
    import importlib.util

    assert importlib.util.find_spec("libtpu") is not None
    done = run([*AS_ON_A_CPU_HOST, "--config=lvis_fewshot"], workdir)
    text = done.stdout + done.stderr
    assert "TPU_WORKER" not in text and "libtpu" not in text, text
    assert done.stderr.startswith("platform: cpu (no TPU or GPU on this host)\n"), done.stderr


def hint_programs():
    """Every command a hint names (the fetch and prepare steps of each recipe's missing data, its held-out set, its
    checkpoint), as its program and sub-command: `hf download`, `python -m vrft_jax.data.prepare virft`, ..."""
    commands = set()
    for name in recipe.available_recipes():
        config = recipe.load(name)
        commands.add(f"hf download {config.model.hub_id} --local-dir {config.model.checkpoint}")
        for which, path in (("train", config.data.path), ("eval", config.eval.path)):
            if path and (config.source.prepare if which == "train" else config.eval.prepare):
                commands.add(recipe.prepare_command(config, which))
        if config.source.download.startswith("hf "):  # else prose: LISA's folders come from its own repository
            commands.add(config.source.download)
    programs = set()
    for command in commands:
        words = shlex.split(command)
        programs.add(tuple(words[:4]) if words[0] == "python" else tuple(words[:2]))
    return sorted(programs)


@pytest.mark.parametrize("program", hint_programs(), ids=" ".join)
def test_each_hint_names_a_program_that_exists(workdir, program):
    if program[0] == "python":
        done = run([*program[1:], "--help"], workdir)
    else:
        executable = os.path.join(os.path.dirname(sys.executable), program[0])
        done = subprocess.run([executable, *program[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (program, done.stderr[-2000:])


def test_the_readme_lists_every_recipe_with_its_arguments_and_links_nothing_outside_the_clone():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]*(?:\\\|[^|]*)*) \|", readme, re.M)}
    for name in recipe.available_recipes():
        module = recipe._module(os.path.join(recipe.CONFIG_DIR, f"{name}.py"))
        expected = ", ".join(f"`{arg}=" + "\\|".join(str(v) for v in recipe._default_first(default, allowed)) + "`"
                             for arg, (default, allowed) in module.ARGS.items()) or "none"
        assert rows.get(name) == expected, (name, rows.get(name), expected)
    assert "../" not in readme


@pytest.mark.parametrize("name", [n for n in recipe.available_recipes() if n != "demo"])
def test_a_missing_held_out_set_says_what_to_fetch_and_the_prepare_command(name):
    config = recipe.load(name)
    hint = recipe.how_to_make(config, "eval")
    assert hint.startswith("to make it, fetch the sources: ") and config.eval.download in hint
    assert hint.endswith(recipe.prepare_command(config, "eval"))
