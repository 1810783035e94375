"""Tests of ``tools/routing_report.py --html``: the page's numbers against the CSV the tool writes and against the
router probabilities of a forward pass run here, and the page rendered in headless Chromium (skipped when no
Chromium is installed)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.data import MixedInstructionDataModule
from mole_lightning.peft import MoLEConfig, iter_routers
from mole_lightning.training import ModelSpec, MoLELightningModule
from tests.conftest import write_checkpoint

SOURCES = ("general", "doc", "med")
LAYERS = ("L0", "L1", "L2")
PAGE_SAMPLES = 2
BATCH_SIZE = 4
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]


class PageParser(HTMLParser):
    """Collects the token spans, the fraction table cells and the ``<body>`` attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.spans: list[dict[str, str]] = []
        self.images: list[str] = []
        self.fractions: dict[tuple[str, str, str], list[float]] = {}
        self._table: str | None = None
        self._row: tuple[str, str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = values
        elif tag == "span" and values.get("class") == "tok":
            self.spans.append(values)
        elif tag == "img":
            self.images.append(values["src"])
        elif tag == "table" and values.get("class") == "fractions":
            self._table = values["data-token-type"]
        elif tag == "tr" and self._table is not None and "data-layer" in values:
            self._row = (self._table, values["data-layer"], values["data-source"])
            self.fractions[self._row] = []
        elif tag == "td" and self._row is not None and "data-value" in values:
            self.fractions[self._row].append(float(values["data-value"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
            self._row = None


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def samples_json(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="routing-samples">(.*?)</script>', page, re.S)
    assert match, "the page embeds its sample routing as JSON"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, demo) -> dict[str, Any]:
    """A 3-layer tiny model saved as a training checkpoint (architecture in its hyper-parameters), the report with
    its page, and the model itself as the reference."""
    root = tmp_path_factory.mktemp("routing_page")
    spec = ModelSpec(
        preset="tiny",
        llm_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
        ),
    )
    module = MoLELightningModule(
        architecture=spec,
        mole=MoLEConfig(dropout=0.0, num_experts=3, rank=4, alpha=8.0),
        tokenizer=demo.tokenizer,
        model_seed=3,
    )
    model = module.build_model().eval()
    with torch.no_grad():  # uneven routing, as after training
        for name, param in model.named_parameters():
            if name.endswith("router.bias"):
                param.add_(torch.tensor([0.4, 0.0, -0.4]))
    module.model = model
    checkpoint = root / "last.ckpt"
    write_checkpoint(checkpoint, module)

    from tools.routing_report import main

    out = root / "report"
    page = out / "routing.html"
    vals = [f"--val={s}={demo.val[s]}" for s in SOURCES]
    args = ["--ckpt", str(checkpoint), "--tokenizer", demo.tokenizer, *vals, "--max-samples", str(BATCH_SIZE)]
    args += ["--batch-size", str(BATCH_SIZE), "--out", str(out), "--html", str(page)]
    assert main([*args, "--html-samples", str(PAGE_SAMPLES)]) == 0
    return {"demo": demo, "model": model, "out": out, "page": page, "root": root}


def reference_routing(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per sample id: answer token ids and, per layer, the softmax of the router's linear map of its MLP input,
    captured with hooks during a forward pass on the same batches the tool reads."""
    model = report["model"]
    tower = model.vision_tower
    datamodule = MixedInstructionDataModule(
        sources=report["demo"].sources("val"),
        val_sources=report["demo"].sources("val"),
        tokenizer=report["demo"].tokenizer,
        num_image_tokens=model.num_image_tokens,
        image_size=tower.image_size,
        image_mean=tuple(tower.image_mean),
        image_std=tuple(tower.image_std),
        batch_size=BATCH_SIZE,
        num_workers=0,
        samples_per_epoch=1,
    )
    datamodule.setup("validate")
    routers = [router for _, router in iter_routers(model)]
    inputs: list[torch.Tensor] = []
    hooks = [router.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for router in routers]
    reference = {}
    try:
        for source in SOURCES:
            batch = next(iter(datamodule.source_loader(source, "train")))
            inputs.clear()
            with torch.no_grad():
                model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], has_image=batch["has_image"])
            probs = torch.stack(
                [
                    F.linear(x.reshape(*batch["input_ids"].shape, -1).float(), r.weight, r.bias).softmax(-1)
                    for x, r in zip(inputs, routers)
                ]
            )  # (layers, B, S, K)
            for row in range(PAGE_SAMPLES):
                answer = batch["labels"][row] != IGNORE_INDEX
                reference[batch["id"][row]] = {
                    "source": source,
                    "token_ids": batch["input_ids"][row][answer].tolist(),
                    "probs": probs[:, row][:, answer],
                }
    finally:
        for hook in hooks:
            hook.remove()
    return reference


def test_page_samples_match_router_probabilities_of_a_forward_pass(report: dict[str, Any]) -> None:
    page = report["page"].read_text(encoding="utf-8")
    data = samples_json(page)
    reference = reference_routing(report)
    assert data["layers"] == list(LAYERS)
    assert [s["source"] for s in data["samples"]] == [s for s in SOURCES for _ in range(PAGE_SAMPLES)]
    assert {s["id"] for s in data["samples"]} == set(reference)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(report["demo"].tokenizer)
    for sample in data["samples"]:
        expected = reference[sample["id"]]
        assert sample["token_ids"] == expected["token_ids"]
        assert "".join(sample["pieces"]) == tokenizer.decode(expected["token_ids"], skip_special_tokens=False)
        probs = torch.tensor(sample["probs"])  # (layers, tokens, K), rounded to 4 decimals
        torch.testing.assert_close(probs, expected["probs"], atol=1e-4, rtol=0)
        assert sample["experts"] == expected["probs"].argmax(-1).tolist()
    experts = [e for s in data["samples"] for layer in s["experts"] for e in layer]
    assert len(set(experts)) == 3, "the shifted router biases send tokens to every expert"


def test_page_tables_equal_the_csv_files(report: dict[str, Any]) -> None:
    page = report["page"].read_text(encoding="utf-8")
    parsed = parse_page(page)
    with open(report["out"] / "routing_fractions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = {(r["token_type"], r["layer"], r["source"]): [float(r[f"expert_{e}"]) for e in range(3)] for r in rows}
    assert parsed.fractions == expected
    assert {key[0] for key in expected} == {"all", "image", "text"}
    with open(report["out"] / "specialization.csv", newline="") as handle:
        mi = {(r["token_type"], r["layer"]): float(r["mi_bits"]) for r in csv.DictReader(handle)}
    shown = re.findall(r'<td class="name">(L\d)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td>', page)
    assert [row[0] for row in shown] == list(LAYERS)
    for layer, *values in shown:
        for tokens, value in zip(("all", "image", "text"), values):
            assert float(value) == pytest.approx(mi[(tokens, layer)], abs=5e-5)
    summary = json.loads((report["out"] / "summary.json").read_text())
    assert summary["layers"] == list(LAYERS)  # the architecture came from the checkpoint (3 layers, not tiny's 2)


def test_page_is_self_contained(report: dict[str, Any]) -> None:
    from PIL import Image

    page = report["page"].read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "<link" not in page and "<script src" not in page
    images = parse_page(page).images
    assert len(images) == 4  # MI per layer, heatmaps of all, image and text tokens
    for src in images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :]))) as image:
            assert min(image.size) > 100


def test_bad_sample_count_is_rejected(report: dict[str, Any]) -> None:
    from tools.routing_report import main

    demo = report["demo"]
    args = ["--ckpt", str(report["root"] / "last.ckpt"), "--tokenizer", demo.tokenizer, f"--val=doc={demo.val['doc']}"]
    with pytest.raises(SystemExit, match="--html-samples must be at least 0, got -1"):
        main([*args, "--out", str(report["root"] / "bad"), "--html", "x.html", "--html-samples", "-1"])


def run_chromium(report: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    profile = report["root"] / f"chromium-profile-{len(list(report['root'].glob('chromium-profile-*')))}"
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def console_messages(stderr: str) -> list[str]:
    """Lines of the page's console (``console.*`` calls and uncaught errors) in Chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def to_fixed_1(x: float) -> str:
    """JavaScript's ``x.toFixed(1)`` for x >= 0: the exact binary value rounded to one decimal, a tie to the larger
    (Python's ``f"{x:.1f}"`` rounds a tie such as 12.25 to even: 12.2 where the page shows 12.3)."""
    return str(Decimal(x).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary installed")
@pytest.mark.parametrize("layer", ["L0", "L2"])
def test_page_renders_and_colours_tokens_by_the_chosen_layer(report: dict[str, Any], layer: str) -> None:
    url = f"{report['page'].as_uri()}#{layer}"
    result = run_chromium(report, "--dump-dom", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    dom = parse_page(result.stdout)
    assert dom.body.get("data-ready") == "true", "the page script ran to its end"
    assert dom.body.get("data-layer") == layer
    data = samples_json(report["page"].read_text(encoding="utf-8"))
    index = data["layers"].index(layer)
    expected = [(i, t, s["experts"][index][t]) for i, s in enumerate(data["samples"]) for t in range(len(s["pieces"]))]
    assert len(dom.spans) == len(expected) > 0
    for span, (sample, token, expert) in zip(dom.spans, expected):
        assert (int(span["data-sample"]), int(span["data-token"])) == (sample, token)
        assert int(span["data-expert"]) == expert
        red, green, blue = (int(data["colours"][expert][i : i + 2], 16) for i in (1, 3, 5))
        assert f"background-color: rgb({red}, {green}, {blue})" in span["style"]
        probs = data["samples"][sample]["probs"][index][token]
        assert f"at {layer}: expert {expert}" in span["title"]
        assert all(f"e{e}: {to_fixed_1(100 * p)}%" in span["title"] for e, p in enumerate(probs))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary installed")
def test_layers_differ_and_screenshot_is_not_blank(report: dict[str, Any]) -> None:
    from PIL import Image

    data = samples_json(report["page"].read_text(encoding="utf-8"))
    first = [s["experts"][0] for s in data["samples"]]
    last = [s["experts"][-1] for s in data["samples"]]
    assert first != last, "choosing another layer re-colours some tokens"
    screenshot = report["root"] / "page.png"
    result = run_chromium(report, "--window-size=1000,2400", f"--screenshot={screenshot}", report["page"].as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    with Image.open(screenshot) as image:
        assert image.size == (1000, 2400)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100  # text, heatmaps and coloured tokens


def test_inputs_are_rebuilt_with_the_runs_data_settings_unless_overridden(tmp_path) -> None:
    """A run trained with ChatML, 64 tokens and ``crop`` images is analysed with them by default (the checkpoint's
    DataModule hyper-parameters, or the ``data_config.json`` of its export); a flag overrides one setting."""
    from tools.routing_report import build_parser, data_settings

    trained = {"template": "chatml", "system_prompt": "Be brief.", "max_length": 64, "image_aspect": "crop"}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "datamodule_hyper_parameters": {**trained, "batch_size": 4}}, checkpoint)
    export = tmp_path / "export"
    export.mkdir()
    (export / "data_config.json").write_text(json.dumps(trained))
    required = ["--tokenizer", "tok", "--val", "general=x.tar", "--out", "out"]
    for weights in (["--ckpt", str(checkpoint)], ["--adapter", str(export)]):
        assert data_settings(build_parser().parse_args([*weights, *required])) == trained
        overridden = data_settings(build_parser().parse_args([*weights, *required, "--template", "vicuna_v1"]))
        assert overridden == {**trained, "template": "vicuna_v1"}
    pickled = tmp_path / "pickled.ckpt"  # hyper-parameters that need --trust-checkpoint (a Path is no plain value)
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"root": tmp_path}, "datamodule_hyper_parameters": trained}, pickled
    )
    trusted = build_parser().parse_args(["--ckpt", str(pickled), "--trust-checkpoint", *required])
    assert data_settings(trusted) == trained
    (export / "data_config.json").unlink()  # an export without recorded settings: the DataModule's defaults
    defaults = data_settings(build_parser().parse_args(["--adapter", str(export), *required]))
    assert defaults == {"template": "vicuna_v1", "system_prompt": None, "max_length": 2048, "image_aspect": "pad"}
