"""examples/finetune_phi3.py and examples/chat_phi3.py, end to end on a tiny random Phi-3 (CPU, seconds each)."""

import argparse
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora
from lora.phi3 import ByteTokenizer, Phi3Config, Phi3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORLD_CHATS = EXAMPLES / "data" / "world_chat_train.jsonl"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = _load_example("finetune_phi3")
chat = _load_example("chat_phi3")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-phi3")
    tok = ByteTokenizer()
    config = Phi3Config(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(WORLD_CHATS.read_text().splitlines(keepends=True)[:48]))
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--eval_steps",
        "3",
        "--save_steps",
        "2",
        "--num_samples",
        "1",
        "--max_new_tokens",
        "4",
        *extra,
    ]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_run_writes_every_output_and_learns(tiny_model, chats, tmp_path):
    out = tmp_path / "run"
    results = finetune.main(_args(tiny_model, chats, out, "--max_steps", "12", "--learning_rate", "5e-3", "--merge"))
    for name in (
        "adapter.safetensors",
        "peft/adapter_model.safetensors",
        "peft/adapter_config.json",
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "results.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert all({"lr", "tokens_per_s"} <= r.keys() for r in rows if "loss" in r)
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    assert json.loads((out / "config.json").read_text())["lora_config"]["r"] == 16
    # Where the wall time went: laps over every phase, which add up to the total.
    seconds = json.loads((out / "results.json").read_text())["seconds"]
    phases = {k: v for k, v in seconds.items() if k != "total"}
    assert {"model", "data", "evaluation before training", "training steps", "eval loss during training"} <= set(phases)
    assert {"checkpoints", "saving", "evaluation after training"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(seconds["total"], abs=0.01 * len(phases))

    # The merged model (HF layout) gives the logits of base + adapter.
    merged = Phi3ForCausalLM.from_pretrained(out / "merged")
    adapted = Phi3ForCausalLM.from_pretrained(tiny_model)
    lora.load_lora(adapted, out / "adapter.safetensors")
    ids = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_packing_trains_on_shuffled_packed_batches(tiny_model, chats, tmp_path):
    """--packing: shuffled conversations in shared rows (the loss's equality with the padded batch is
    tests/phi3/test_model.py's); the run learns, and the batches are not the length-grouped ones."""
    rows = [{"input_ids": [0] * n} for n in (5, 40, 7, 33, 12, 2, 25, 9)]
    assert finetune.step_batches(rows, 4, 1, 0, 0, packing=True) != finetune.step_batches(rows, 4, 1, 0, 0)
    results = finetune.main(
        _args(tiny_model, chats, tmp_path / "run", "--max_steps", "12", "--learning_rate", "5e-3", "--packing")
    )
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]


def test_killed_run_resumes_to_the_same_adapter(tiny_model, chats, tmp_path):
    script = [sys.executable, str(EXAMPLES / "finetune_phi3.py")]
    full = subprocess.run(
        script + _args(tiny_model, chats, tmp_path / "a", "--max_steps", "7"), capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr[-2000:]
    killed = subprocess.run(
        script + _args(tiny_model, chats, tmp_path / "b", "--max_steps", "7", "--kill_after_step", "5"),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9  # SIGKILL, right after step 5; the newest checkpoint is step 4
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert not (tmp_path / "b" / "adapter.safetensors").exists()
    # A half-written checkpoint (crash during a save) is never picked up.
    (tmp_path / "b" / "checkpoints" / ".tmp-step-0000006").mkdir()
    resumed = subprocess.run(
        script + _args(tiny_model, chats, tmp_path / "b", "--max_steps", "7", "--resume"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step-0000004" in resumed.stdout
    a, b = _tensors(tmp_path / "a" / "adapter.safetensors"), _tensors(tmp_path / "b" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on CPU
    steps_a = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps_b = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps_a == steps_b


@pytest.mark.parametrize("base", ["bf16 or fp32", "nf4"])
def test_torchrun_two_processes_match_one_process(tiny_model, chats, tmp_path, base):
    common = [
        *(["--quantize", "nf4"] if base == "nf4" else []),
        "--max_steps",
        "3",
        "--lora_dropout",
        "0",
        "--gradient_accumulation_steps",
        "2",
        "--save_steps",
        "100",
        "--eval_steps",
        "100",
        "--num_samples",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={29517 if base == 'nf4' else 29518}",
        str(EXAMPLES / "finetune_phi3.py"),
    ]
    ddp = subprocess.run(
        torchrun + _args(tiny_model, chats, tmp_path / "ddp", *common, "--per_device_train_batch_size", "2"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_phi3.py")]
        + _args(tiny_model, chats, tmp_path / "one", *common, "--per_device_train_batch_size", "4"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    rows = {}
    for name in ("ddp", "one"):  # the training rows (step 0 holds the eval loss before training)
        rows[name] = [
            row
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if "loss" in (row := json.loads(line))
        ]
    for r_ddp, r_one in zip(rows["ddp"], rows["one"], strict=True):
        assert r_ddp["loss"] == pytest.approx(r_one["loss"], rel=1e-5)  # same global batches, all ranks' tokens
        assert r_ddp["grad_norm"] == pytest.approx(r_one["grad_norm"], rel=1e-4)
    a, b = _tensors(tmp_path / "ddp" / "adapter.safetensors"), _tensors(tmp_path / "one" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    # only rank 0 writes: one metrics line per step, one adapter
    assert len(rows["ddp"]) == 3


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"training_config": {"learning_rate": 1e-4, "seed": 3}, "lora_config": {"r": 4}}))
    args = finetune.parse_settings(["--config", str(cfg), "--seed", "7", "--qkv_slices", "q", "v"])
    assert args.training_config["learning_rate"] == 1e-4  # from the file
    assert args.training_config["seed"] == 7  # the flag wins over the file
    assert args.lora_config["r"] == 4 and args.lora_config["qkv_slices"] == ["q", "v"]
    assert args.lora_config["lora_alpha"] == finetune.lora_config["lora_alpha"]  # untouched default
    assert finetune.training_config["learning_rate"] != 1e-4  # the module's defaults were not mutated


@pytest.mark.parametrize(
    "content, match",
    [
        ({"training_config": {"learning_rte": 1}}, "learning_rte"),
        ({"lora": {}}, "lora"),
    ],
)
def test_config_file_rejects_unknown_keys(tmp_path, content, match):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        finetune.parse_settings(["--config", str(cfg)])


def test_bad_data_is_a_clear_error(tiny_model, chats, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*2|2.*bad\.jsonl"):
        finetune.main(_args(tiny_model, bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written before the data was read
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        finetune.main(_args(tiny_model, empty, tmp_path / "run"))


def test_skip_malformed_counts_and_trains(tiny_model, chats, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        chats.read_text() + "{broken\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    finetune.main(_args(tiny_model, data, tmp_path / "run", "--max_steps", "2", "--skip_malformed"))
    out = capsys.readouterr().out
    assert "1 malformed skipped" in out and "1 without an assistant turn skipped" in out


def test_chat_script_streams_a_reply(tiny_model, chats, tmp_path, capsys):
    out = tmp_path / "run"
    finetune.main(_args(tiny_model, chats, out, "--max_steps", "2"))
    capsys.readouterr()
    chat.main(
        [
            "--model",
            str(tiny_model),
            "--adapter",
            str(out / "adapter.safetensors"),
            "--prompt",
            "Hi",
            "--max_new_tokens",
            "5",
        ]
    )
    printed = capsys.readouterr().out
    assert printed.startswith("> Hi\n")
    # the streamed text is exactly what the adapted model generates greedily
    net, tok = chat.load(tiny_model, out / "adapter.safetensors", None, bf16=False)
    ids = torch.tensor([lora.phi3.encode_prompt([{"role": "user", "content": "Hi"}], tok)])
    gen = net.generate(ids, 5, eos_token_id=list(tok.stop_token_ids))[0, ids.shape[1] :].tolist()
    stop = next((i for i, t in enumerate(gen) if t in tok.stop_token_ids), len(gen))
    assert printed.split("\n", 1)[1].rstrip("\n") == tok.decode(gen[:stop], skip_special_tokens=True)
    # the PEFT export loads too
    capsys.readouterr()
    chat.main(["--model", str(tiny_model), "--peft", str(out / "peft"), "--prompt", "Hi", "--max_new_tokens", "5"])
    assert capsys.readouterr().out == printed


def test_real_checkpoint_layout_with_hf_tokenizer(tmp_path, chats, phi3_like_tokenizer):
    """A directory as the Hub ships Phi-3: config.json, sharded model-0000k-of-0000n.safetensors with an index
    (written by transformers itself), tokenizer.json for the `tokenizers` package. The run trains, and its PEFT
    export loads onto transformers' model with PEFT and gives our adapted logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model_dir = tmp_path / "phi3-like"
    model_dir.mkdir()
    phi3_like_tokenizer(model_dir)
    from lora.phi3 import load_tokenizer

    vocab = load_tokenizer(model_dir).vocab_size
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.Phi3ForCausalLM(config)
    hf.save_pretrained(model_dir, max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file() and len(
        list(model_dir.glob("model-*.safetensors"))
    ) >= 2

    out = tmp_path / "run"
    finetune.main(_args(model_dir, chats, out, "--max_steps", "3"))
    base = transformers.Phi3ForCausalLM.from_pretrained(model_dir).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, out / "peft").eval()
    ours = Phi3ForCausalLM.from_pretrained(model_dir)
    lora.load_lora(ours, out / "adapter.safetensors")
    ids = torch.randint(3, vocab, (2, 12))
    torch.testing.assert_close(with_adapter(input_ids=ids).logits, ours.eval()(ids).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- the command line, as a user meets it

SCRIPT = [sys.executable, str(EXAMPLES / "finetune_phi3.py")]


def _cli(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *argv], check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _short(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A 2-step run with a tiny eval: a few seconds as a subprocess."""
    return _args(model, data, out, "--max_steps", "2", "--eval_steps", "100", "--save_steps", "100", *extra)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_extras(tmp_path) -> dict:
    """An environment where tqdm, matplotlib and tokenizers fail to import, as after ``pip install .``."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("tqdm", "matplotlib", "tokenizers"):
        (stubs / f"{name}.py").write_text(f"raise ImportError('{name} is not installed (test stub)')\n")
    path = [str(stubs), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_runs_with_the_core_dependencies_alone(tiny_model, chats, tmp_path, no_extras):
    out = tmp_path / "run"
    proc = _cli(*_short(tiny_model, chats, out, "--max_steps", "3"), env=no_extras)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # what the missing extras would add is said once
    said = proc.stdout + proc.stderr
    assert said.count("tqdm") == 1 and said.count("matplotlib") == 1, said
    assert "progress bar" in said and "loss.png" in said
    # progress still shows, as a line per logging step
    assert "step 3/3" in proc.stderr
    assert (out / "adapter.safetensors").is_file() and (out / "results.json").is_file()
    assert not (out / "loss.png").exists()


def test_new_run_refuses_a_non_empty_output_dir(tiny_model, chats, tmp_path):
    out = tmp_path / "run"
    finetune.main(_short(tiny_model, chats, out, "--save_steps", "1"))
    adapter = (out / "adapter.safetensors").read_bytes()
    again = _cli(*_short(tiny_model, chats, out, "--max_steps", "3"))
    _assert_one_line_error(again, str(out), "--resume", "--overwrite_output_dir")
    assert (out / "adapter.safetensors").read_bytes() == adapter  # nothing touched
    # --overwrite_output_dir clears the old run: no checkpoint or metrics of it are left to mix with the new one
    finetune.main(_short(tiny_model, chats, out, "--max_steps", "1", "--overwrite_output_dir"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]


def test_overwrite_output_dir_never_clears_files_it_did_not_write(tiny_model, chats, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    proc = _cli(*_short(tiny_model, chats, out, "--overwrite_output_dir"))
    _assert_one_line_error(proc, "notes.txt")
    assert (out / "notes.txt").read_text() == "precious"


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_model, chats, tmp_path):
    out = tmp_path / "run"
    finetune.main(_short(tiny_model, chats, out, "--max_steps", "4", "--save_steps", "2"))
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(chats.read_text().splitlines(keepends=True)[0] * 40)
    proc = _cli(*_short(tiny_model, other_data, out, "--max_steps", "4", "--resume", "--r", "4"))
    line = _assert_one_line_error(proc, "step-0000004", "lora_config.r", "16", "4", "data")
    assert "--overwrite_output_dir" in line
    # (a resume with the same settings: test_killed_run_resumes_to_the_same_adapter)


def test_short_run_checkpoints_and_resume_of_a_finished_run_says_so(tiny_model, chats, tmp_path, capsys):
    out = tmp_path / "run"
    finetune.main(_short(tiny_model, chats, out, "--max_steps", "3"))  # save_steps 100 > max_steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    finetune.main(_short(tiny_model, chats, out, "--max_steps", "3", "--resume"))
    assert "already complete" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing re-trained or rewritten


@pytest.mark.parametrize(
    "case",
    [
        "r0",
        "save_total_limit",
        "resume_without_checkpoint",
        "bad_flag",
        "unknown_key",
        "bad_data",
        "no_model",
        "eval_empty_after_truncation",
    ],
)
def test_user_errors_are_one_line_without_traceback(tiny_model, chats, tmp_path, case):
    out = tmp_path / "run"
    extra, needles = [], []
    data = chats
    if case == "r0":  # r=0 leaves nothing to train: torch's "empty parameter list" before
        extra, needles = ["--r", "0"], ["--r", "0"]
    elif case == "save_total_limit":  # -1 deleted every checkpoint before
        extra, needles = ["--save_total_limit", "-1"], ["--save_total_limit", "-1"]
    elif case == "resume_without_checkpoint":
        extra, needles = ["--resume"], ["--resume", "no checkpoint"]
    elif case == "bad_flag":
        extra, needles = ["--learning_rate", "fast"], ["--learning_rate", "fast"]
    elif case == "unknown_key":
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({"lora_config": {"rank": 8}}))
        extra, needles = ["--config", str(cfg)], ["cfg.json", "rank"]
    elif case == "bad_data":
        data = tmp_path / "bad.jsonl"
        data.write_text(chats.read_text().splitlines()[0] + "\n{not json\n")
        needles = ["bad.jsonl:2"]
    elif case == "no_model":
        extra, needles = ["--model", str(tmp_path / "nowhere")], ["nowhere"]
    elif case == "eval_empty_after_truncation":  # every eval conversation loses its assistant tokens at 256 tokens
        held = tmp_path / "held.jsonl"
        long = {"messages": [{"role": "user", "content": "why? " * 120}, {"role": "assistant", "content": "ok"}]}
        held.write_text((json.dumps(long) + "\n") * 3)
        extra, needles = ["--eval_data", str(held), "--max_seq_length", "256"], ["eval", "truncat", "256"]
    proc = _cli(*_short(tiny_model, data, out, *extra))
    _assert_one_line_error(proc, *needles)
    assert not (out / "checkpoints").exists()


def test_help_shows_every_flag_with_default_and_help_in_groups():
    parser = finetune.build_parser()
    shown = parser.format_help()
    titles = [g.title for g in parser._action_groups]
    for title in ("training", "LoRA", "model and data", "output and evaluation"):
        assert title in titles, titles
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for key in [*finetune.training_config, *finetune.lora_config]:
        assert f"--{key}" in flags, key
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        assert action.help and "(default:" in action.help, action.option_strings
        assert action.option_strings[0] in shown
    assert shown.count("(default:") == len([a for a in parser._actions if a.help and "(default:" in a.help])


def test_end_of_run_lists_every_file_and_the_chat_command(tiny_model, chats, tmp_path, capsys):
    out = tmp_path / "run"
    finetune.main(_short(tiny_model, chats, out))
    printed = capsys.readouterr().out
    tail = printed[printed.index(f"wrote {out}/") :].splitlines()
    listing = list(itertools.takewhile(lambda line: line.startswith("  "), tail[1:]))
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    listed = {line.split()[0] for line in listing}
    assert written == listed
    assert {"results.json", "adapter.safetensors", "peft/adapter_config.json", "metrics.jsonl"} <= listed
    assert tail[len(listing) + 1] == "chat with the result:"
    command = tail[len(listing) + 2].strip()
    argv = shlex.split(command)
    assert argv[0] == "python"
    chatted = subprocess.run(
        [sys.executable, *argv[1:], "--prompt", "Hi", "--max_new_tokens", "3"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chatted.returncode == 0, chatted.stderr[-2000:]
    assert chatted.stdout.startswith("> Hi\n")


def test_readme_chat_command_works_for_the_default_run(chats, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.strip()
        for line in readme.splitlines()
        if line.strip().startswith("python examples/chat_phi3.py") and "path/to" not in line
    ]
    assert commands, "README shows no chat command for the default run"
    (tmp_path / "examples").symlink_to(EXAMPLES)  # README's commands run from the repository root
    monkeypatch.chdir(tmp_path)  # the default --output_dir, runs/phi3-lora, is relative
    finetune.main(
        [
            "--data",
            str(chats),
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--eval_fraction",
            "0",
            "--num_samples",
            "0",
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    printed_argv = shlex.split(printed[printed.index("chat with the result:") + 1])
    for command in commands:
        argv = shlex.split(command)
        chatted = subprocess.run(
            [sys.executable, *argv[1:], "--max_new_tokens", "4"],  # as written, replies cut short
            check=False,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            input="",
        )
        assert chatted.returncode == 0, (command, chatted.stderr[-2000:])
        # and the run printed the same command (here with the script's absolute path: the cwd is elsewhere)
        assert printed_argv[2:] == (argv[2 : argv.index("--prompt")] if "--prompt" in argv else argv[2:])


def test_loss_plot_shows_title_the_before_point_markers_and_integer_steps(tiny_model, chats, tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    saved = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    finetune.main(_short(tiny_model, chats, tmp_path / "run", "--eval_steps", "1", "--num_samples", "0"))
    (ax,) = saved[0].axes
    assert ax.get_title()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["eval loss"].get_xdata()) == [0, 1, 2]  # the eval loss before training comes first
    assert all(line.get_marker() not in (None, "", "None", " ") for line in lines.values())
    saved[0].canvas.draw()
    lo, hi = ax.get_xlim()
    assert all(t == int(t) for t in ax.get_xticks() if lo <= t <= hi)


def test_one_conversation_eval_split_warns(tiny_model, chats, tmp_path, capsys):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(chats.read_text().splitlines(keepends=True)[:10]))  # 5% of 10 -> 1 conversation
    finetune.main(_short(tiny_model, few, tmp_path / "run", "--max_steps", "1", "--num_samples", "0"))
    err = capsys.readouterr().err
    assert "1 conversation" in err and "--eval_data" in err


def test_full_finetune_writes_a_model_to_chat_with_and_keeps_the_settings(tiny_model, chats, tmp_path, capsys):
    out = tmp_path / "run"
    finetune.main(_short(tiny_model, chats, out, "--max_steps", "1", "--full_finetune", "--num_samples", "0"))
    assert json.loads((out / "config.json").read_text())["training_config"]["full_finetune"]  # not the model's
    printed = capsys.readouterr().out.splitlines()
    argv = shlex.split(printed[printed.index("chat with the result:") + 1])
    assert argv[2] == "--model" and Path(argv[3]).resolve() == (out / "model").resolve() and len(argv) == 4
    chat.main([*argv[2:], "--prompt", "Hi", "--max_new_tokens", "2"])
    assert capsys.readouterr().out.startswith("> Hi\n")


def test_answer_match_is_whole_word() -> None:
    """The example's answer match: the answer must stand as a whole word, so a wrong "1900" never counts for
    "900" (population values of the world include both)."""
    example = _load_example("finetune_phi3")
    qa = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"X has {a} people."}],
            "answer": a,
        }
        for a in ("900", "900", "1900")
    ]
    assert example.qa_prompts(qa) == [[{"role": "user", "content": "q"}]] * 3
    scores = example.qa_scores(qa, ["X has 1900 people.", "X has 900 people.", "X has 1900 people."])
    assert scores["answer_match"] == 2 / 3 and scores["exact_match"] == 2 / 3


def test_evaluation_decodes_questions_and_samples_in_one_call(monkeypatch) -> None:
    """The held-out questions and the sample prompts go through one ``replies`` call (in the generation batches),
    and each reply comes back to its own list: the questions' to the scores, the samples' to the samples."""
    example = _load_example("finetune_phi3")
    qa = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    samples = [[{"role": "user", "content": "s0"}], [{"role": "user", "content": "s1"}]]
    calls = []

    def fake_replies(model, tokenizer, prompts, max_new_tokens, batch_size, device):
        calls.append((len(prompts), batch_size))
        # the reply to "qN" is "aN" except for q1; a sample's reply echoes its prompt
        return [p[-1]["content"].replace("q", "a") if p[-1]["content"] != "q1" else "wrong" for p in prompts]

    monkeypatch.setattr(example, "replies", fake_replies)
    cfg = dict(example.training_config)
    out = example.evaluate(None, None, [], qa, samples, cfg, "cpu", known_loss=0.5)
    assert calls == [(5, cfg["generation_batch_size"])]
    assert out["qa"]["exact_match"] == 2 / 3 and out["samples"] == ["s0", "s1"] and out["eval_loss"] == 0.5
    out = example.evaluate(None, None, [], [], samples, cfg, "cpu", known_loss=None)  # no held-out questions
    assert "qa" not in out and out["samples"] == ["s0", "s1"]


def test_optimizer_is_fused_adamw_except_over_fsdp_shards() -> None:
    """The example's AdamW runs fused (one kernel for every LoRA tensor's update); FSDP2's DTensor parameters keep
    torch's default implementation."""
    example = _load_example("finetune_phi3")
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = dict(example.training_config)
    fused = example.adamw(params, cfg)
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == cfg["learning_rate"]
    assert example.adamw(params, {**cfg, "fsdp": True}).defaults["fused"] is None


def test_variants_dora_pissa_loraplus_train_merge_and_resume(tiny_model, chats, tmp_path):
    """--use_dora --init_lora_weights pissa_niter_2 --loraplus_lr_ratio 16: the adapter file says so, the merged model
    and the adapter on the original base agree, the PEFT export is the converted rank-2r LoRA, and a killed run
    resumes to the same adapter bit for bit."""
    variant = ("--use_dora", "--init_lora_weights", "pissa_niter_2", "--loraplus_lr_ratio", "16")
    out = tmp_path / "run"
    finetune.main(_args(tiny_model, chats, out, "--max_steps", "5", "--merge", *variant))
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        entries = json.loads(f.metadata()["modules"])
        keys = set(f.keys())
    assert all(e["use_dora"] and e["init_lora_weights"] == "pissa_niter_2" for e in entries.values())
    assert any(k.endswith(".lora_magnitude") for k in keys) and any(k.endswith(".lora_A_init") for k in keys)
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] is True and peft_cfg["init_lora_weights"] is True and peft_cfg["r"] == 2 * 16 * 3
    merged = Phi3ForCausalLM.from_pretrained(out / "merged")
    adapted = Phi3ForCausalLM.from_pretrained(tiny_model)  # the original base: load_lora subtracts the initial adapter
    lora.load_lora(adapted, out / "adapter.safetensors")
    ids = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, atol=1e-5, rtol=1e-5)

    script = [sys.executable, str(EXAMPLES / "finetune_phi3.py")]
    killed = subprocess.run(
        script
        + _args(
            tiny_model,
            chats,
            tmp_path / "b",
            "--max_steps",
            "5",
            "--num_samples",
            "0",
            "--kill_after_step",
            "3",
            *variant,
        ),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run(
        script
        + _args(tiny_model, chats, tmp_path / "b", "--max_steps", "5", "--num_samples", "0", "--resume", *variant),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _tensors(out / "adapter.safetensors"), _tensors(tmp_path / "b" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_training_step_runs_the_fused_path_and_matches_the_plain_ops():
    """--bf16 (bf16 weights, fp32 adapters, autocast): the fused LoRA function runs in every adapted projection, and
    loss and LoRA gradients equal the plain ops' (the path of cases the fused one does not cover) within bf16 rounding."""
    import contextlib
    import copy
    from unittest import mock

    import lora.functional
    from lora.phi3 import collate, load_conversations

    tok = ByteTokenizer()
    rows, _ = finetune.tokenize_all(load_conversations(WORLD_CHATS)[0][:2], tok, 160)
    batch = collate(rows, tok.pad_token_id)
    # The built-in phi3-tiny, whose loss responds to the adapter (a random model's barely does). bf16 matmuls are
    # slow on CPUs without bf16 units: two short conversations.
    model = Phi3ForCausalLM.from_pretrained(EXAMPLES / "phi3-tiny", dtype=torch.bfloat16)
    torch.manual_seed(0)
    lora.phi3.inject(model, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():  # B != 0: the LoRA term is part of the loss, and of A's gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32}

    def step(plain: bool) -> tuple[float, list[torch.Tensor], int]:
        for p in adapters:
            p.grad = None
        spy = mock.patch.object(lora.functional._FusedLoRALinear, "apply", wraps=lora.functional._FusedLoRALinear.apply)
        off = mock.patch("lora.layers._fused_dtype", return_value=None) if plain else contextlib.nullcontext()
        with spy as calls, off:
            loss_sum, n = finetune.token_loss_sum(model, batch, autocast=True)
            (loss_sum / n).backward()
        return float(loss_sum.detach() / n), [p.grad.clone() for p in adapters], calls.call_count

    loss_fused, grads_fused, calls = step(plain=False)
    loss_plain, grads_plain, plain_calls = step(plain=True)
    assert calls == 4 * 4 and plain_calls == 0  # 4 projections x 4 layers, each through the fused function
    # Within bf16 rounding: the fused loss is as close to the exact loss (the same weights and adapter in fp32, no
    # autocast) as the plain ops' loss is, up to 2x (the two paths round the LoRA term at different points). Here
    # both are about 0.4% off, on opposite sides: bf16 logits of size ~10 carry ~0.02 of rounding each.
    ref = copy.deepcopy(model).float()
    ref_sum, n = finetune.token_loss_sum(ref, batch, autocast=False)
    (ref_sum / n).backward()
    loss_ref, grads_ref = float(ref_sum.detach() / n), [p.grad for p in ref.parameters() if p.requires_grad]
    tolerance = 2 * max(abs(loss_plain - loss_ref), 2.0**-9 * loss_ref)  # floor: half a bf16 step of the loss
    assert abs(loss_fused - loss_ref) <= tolerance, (loss_fused, loss_plain, loss_ref)
    with torch.no_grad():  # the test can fail: without the LoRA term the loss is far outside that tolerance
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()
        base_sum, n = finetune.token_loss_sum(model, batch, autocast=True)
    assert abs(float(base_sum / n) - loss_ref) > 5 * tolerance
    # The LoRA gradients likewise: as close to the exact ones as the plain ops' are (relative Frobenius error).
    err = [[float((g - r).norm() / r.norm()) for g, r in zip(grads, grads_ref)] for grads in (grads_fused, grads_plain)]
    assert all(0 < e_plain for e_plain in err[1])
    assert all(e_fused <= 2 * max(e_plain, 2.0**-9) for e_fused, e_plain in zip(*err)), err


# -- QLoRA (--quantize nf4) ------------------------------------------------------------------------------------


def test_qlora_run_trains_over_a_4bit_base_exports_and_merges_into_bf16(tiny_model, chats, tmp_path, capsys):
    out = tmp_path / "run"
    results = finetune.main(
        _args(tiny_model, chats, out, "--max_steps", "8", "--learning_rate", "5e-3", "--quantize", "nf4", "--merge")
    )
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    printed = capsys.readouterr().out
    assert "NF4" in printed
    argv = shlex.split(printed.splitlines()[printed.splitlines().index("chat with the result:") + 1])
    assert argv[-2:] == ["--quantize", "nf4"]
    # The adapter is an ordinary LoRA adapter: over the 4-bit base (as trained), and its PEFT export the same.
    net, _ = chat.load(tiny_model, out / "adapter.safetensors", None, bf16=False, quantize="nf4")
    via_peft, _ = chat.load(tiny_model, None, out / "peft", bf16=False, quantize="nf4")
    assert isinstance(net.model.layers[0].mlp.down_proj.weight, lora.qlora.Weight4bit)
    ids = torch.randint(0, 256, (2, 10))
    adapted = net(ids).logits
    torch.testing.assert_close(via_peft(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    # --merge: the base dequantized to bf16, the adapter merged into it, saved as a plain bf16 checkpoint.
    merged = Phi3ForCausalLM.from_pretrained(out / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    base_bf16 = lora.dequantize(Phi3ForCausalLM.from_pretrained(tiny_model, quantize="nf4"), dtype=torch.bfloat16)
    lora.load_lora(base_bf16, out / "adapter.safetensors")
    lora.merge_and_unload(base_bf16)
    for key, value in base_bf16.to(torch.bfloat16).state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    # and it computes what the 4-bit base + adapter computes, to within bf16 rounding
    merged_logits = merged.float()(ids).logits
    assert ((merged_logits - adapted).abs().max() / adapted.abs().max()).item() < 0.05


def test_killed_qlora_run_resumes_to_the_same_adapter(tiny_model, chats, tmp_path):
    script = [sys.executable, str(EXAMPLES / "finetune_phi3.py")]
    common = ["--max_steps", "5", "--quantize", "nf4", "--num_samples", "0"]
    full = subprocess.run(script + _args(tiny_model, chats, tmp_path / "a", *common), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = subprocess.run(
        script + _args(tiny_model, chats, tmp_path / "b", *common, "--kill_after_step", "3"),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9
    resumed = subprocess.run(
        script + _args(tiny_model, chats, tmp_path / "b", *common, "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-0000002" in resumed.stdout
    a, b = _tensors(tmp_path / "a" / "adapter.safetensors"), _tensors(tmp_path / "b" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a QLoRA checkpoint does not resume as a bf16/fp32 LoRA run (another base)
    other = _cli(*_args(tiny_model, chats, tmp_path / "b", "--max_steps", "5", "--num_samples", "0", "--resume"))
    _assert_one_line_error(other, "quantize")


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--quantize", "int4"], ["--quantize", "int4"]),
        (["--quantize", "nf4", "--full_finetune"], ["--quantize", "full"]),
        (["--quantize", "nf4", "--init_lora_weights", "pissa"], ["--quantize", "PiSSA"]),
    ],
)
def test_bad_quantize_settings_are_one_line_errors(tiny_model, chats, tmp_path, extra, needles):
    _assert_one_line_error(_cli(*_short(tiny_model, chats, tmp_path / "run", *extra)), *needles)


def test_qdora_run_trains_over_a_4bit_base_and_reloads(tiny_model, chats, tmp_path):
    """--quantize nf4 --use_dora (QDoRA): trains, and the adapter file (with its magnitudes) reloads over a fresh
    4-bit base to the same logits as the run's model."""
    out = tmp_path / "run"
    results = finetune.main(
        _args(tiny_model, chats, out, "--max_steps", "4", "--learning_rate", "5e-3", "--quantize", "nf4", "--use_dora")
    )
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        assert any(k.endswith(".lora_magnitude") for k in f.keys())
    net, _ = chat.load(tiny_model, out / "adapter.safetensors", None, bf16=False, quantize="nf4")
    assert isinstance(net.model.layers[0].self_attn.qkv_proj.weight, lora.qlora.Weight4bit)
    # the oracle: the same adapter over the weights the 4 bits encode, held in fp32
    dense = lora.dequantize(Phi3ForCausalLM.from_pretrained(tiny_model, quantize="nf4"))
    lora.load_lora(dense, out / "adapter.safetensors")
    ids = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(net(ids).logits, dense.eval()(ids).logits, atol=1e-5, rtol=1e-5)
