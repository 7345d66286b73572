"""lora.peft_format: clear errors for PEFT configs this library reads. (Logit parity with PEFT on transformers'
Phi-3, both directions, is in test_checkpoint.py next to the native format's tests, which share its fixtures.)"""

import json

import pytest
import torch
import torch.nn as nn

import lora


def exported(tmp_path, **cfg_changes):
    """A PEFT directory exported from a two-layer model, with adapter_config.json edited by ``cfg_changes``
    (a value of None deletes the key)."""
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(4, 4, r=2, lora_alpha=4), nn.Linear(4, 4))
    lora.export_peft(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in cfg_changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path


def plain():
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def test_config_without_r_says_so_and_names_peft_default(tmp_path):
    with pytest.raises(ValueError, match=r"rank 2 but adapter_config.json gives no r \(PEFT's default is 8\)"):
        lora.import_peft(plain(), exported(tmp_path, r=None))


def test_invalid_pattern_regex_names_the_file_and_key(tmp_path):
    d = exported(tmp_path, rank_pattern={"(unclosed": 4})
    with pytest.raises(ValueError, match=r"adapter_config.json.*rank_pattern key '\(unclosed' is not a valid regular"):
        lora.import_peft(plain(), d)


def test_unknown_config_keys_are_warned_about_by_name(tmp_path):
    d = exported(tmp_path, use_future_variant=True)
    with pytest.warns(UserWarning, match=r"\['use_future_variant'\]"):
        lora.import_peft(plain(), d)


def test_import_peft_is_strict_about_lora_layers_the_adapter_does_not_cover(tmp_path):
    d = exported(tmp_path)
    model = nn.Sequential(nn.Linear(4, 4), lora.Linear(4, 4, r=2))
    with pytest.raises(ValueError, match=r"1: has LoRA in the model but not in the adapter \(strict=True\)"):
        lora.import_peft(model, d)
    assert type(model[0]) is nn.Linear
    assert lora.import_peft(model, d, strict=False) == ["0"]
