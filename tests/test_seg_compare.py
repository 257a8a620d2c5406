"""``segment compare``: learning-rate sweep per setting, choice on validation, test on the winner only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.seg.synth import make_shapes_dataset


def test_compare_writes_and_prints_its_table(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", 20, size=(32, 32), seed=2)
    config = {
        "data": {
            "root": str(data),
            "num_workers": 0,
            "batch_size": 8,
            "samples_per_image": 1,
            "augment": {"stain_jitter": 0.0},
        },
        "model": {
            "encoder": "vit_tiny_patch16_224",
            "weights": "none",
            "img_size": 32,
            "decoder": "pup",
            "decoder_channels": 1,
            "encoder_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        },
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        },
        "run": {"root": str(tmp_path / "runs"), "name": "cmp"},
        "compare": {
            "lrs": [1e-3],
            "settings": [
                {"name": "frozen", "adapter": {"mode": "frozen"}},
                {"name": "full", "adapter": {"mode": "full"}},
                {"name": "lora", "adapter": {"method": "lora", "options": {"rank": 2}}, "lrs": [1e-3, 1e-2]},
            ],
        },
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["segment", "compare", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| setting | mode | method | best_lr | val_dice | test_dice |" in result.output

    root = tmp_path / "runs" / "cmp"
    table = pd.read_csv(root / "comparison.csv")
    assert list(table["setting"]) == ["frozen", "full", "lora"] and (table["status"] == "ok").all()
    for column in ("test_dice", "test_iou", "test_hd95", "trainable", "trainable_pct", "sec_per_epoch"):
        assert table[column].notna().all(), column
    assert table.set_index("setting").loc["full", "trainable_pct"] == 100.0
    assert (root / "comparison.md").read_text().count("\n") == 5
    assert (root / "plots" / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    # the reported lr is the one with the best VALIDATION Dice, and only that run was tested
    sweep = pd.read_csv(root / "lr_sweep.csv")
    lora = sweep[sweep["setting"] == "lora"]
    assert len(lora) == 2
    best = lora.loc[lora["val_dice"].idxmax()]
    assert table.set_index("setting").loc["lora", "best_lr"] == best["lr"]
    tested = [p.parent.name for p in (root / "lora").glob("*/test_metrics.json")]
    assert tested == [Path(best["checkpoint"]).parent.name]

    # multi-process strategies are refused: the settings run one after another in this process
    again = CliRunner().invoke(
        main, ["segment", "compare", str(path), "--set", "trainer.devices=2", "--set", "run.name=other"]
    )
    assert again.exit_code == 2 and "one device" in again.output


def test_settings_may_not_override_what_every_setting_shares() -> None:
    """A fair table: data, split, evaluation and seed are the same for every contender."""
    from pydantic import ValidationError

    from pathopeft.config.segment import SegCompareSetting

    ok = SegCompareSetting(
        name="wide",
        adapter={"method": "lora", "options": {"rank": 2}},
        overrides=["model.decoder_channels=64"],
    )
    assert ok.overrides == ["model.decoder_channels=64"]
    for override, hint in [
        ("data.val_fraction=0.5", "set it in the base sections"),
        ("seed=3", "set it in the base sections"),
        ("optimizer.lr=0.1", "list its learning rates in lrs"),
        ("data={}", "set it in the base sections"),
    ]:
        with pytest.raises(ValidationError, match=hint):
            SegCompareSetting(
                name="x", adapter={"method": "lora", "options": {"rank": 2}}, overrides=[override]
            )


@pytest.mark.parametrize("name", ["seg_cnn_compare.yaml", "seg_cnn_compare_cpu.yaml"])
def test_shipped_cnn_compare_configs_target_the_pointwise_convs(name: str, tmp_path: Path) -> None:
    """Every adapter setting wraps exactly the 1x1 convs of EfficientNet-Lite0 (no depthwise, no
    stem) and trains at most 10% of the encoder."""
    from pathopeft.config import load_config
    from pathopeft.config.segment import SegmentCompareConfig
    from pathopeft.seg.compare import setting_config
    from pathopeft.seg.model import build_model

    cfg = load_config(SegmentCompareConfig, Path(__file__).resolve().parents[1] / "configs" / name)
    for setting in cfg.compare.settings:
        if setting.adapter.mode != "adapter":
            continue
        run = setting_config(cfg, setting, 1e-3, tmp_path)
        run.model.img_size = 64
        model = build_model(run, verbose=False)
        wrapped = {
            n.rsplit(".", 1)[-1] for n, m in model.encoder.model.named_modules() if hasattr(m, "base_layer")
        }
        assert wrapped == {"conv_pw", "conv_pwl"}, (setting.name, wrapped)
        share = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad) / sum(
            p.numel() for p in model.encoder.parameters()
        )
        assert 0 < share <= 0.10, (setting.name, share)
