"""A self-contained HTML page of a routing analysis: heatmaps, MI per layer, and sample answers coloured by expert.

:func:`sample_routing` reads, after a forward pass, every MoLE router's ``record`` (``expert``, ``valid``,
``probs``) for chosen rows of the batch and keeps, for each answer token (``labels != -100``), its top-1 expert and
router probabilities at every layer. :func:`render_routing_page` writes one HTML document with everything inline
(PNG figures as data URIs, the per-token routing as JSON, a few lines of plain JavaScript, no external asset):

* per layer, ``MI(source; expert)`` of all, image and text tokens (figure and table);
* the source × expert heatmaps of :func:`~mole_lightning.eval.routing_analysis.plot_routing_heatmaps` for all, image and
  text tokens, and the same fractions as tables;
* for each sample, its prompt in grey and its answer tokens coloured by their expert at the layer chosen in a
  ``<select>``; hovering a token shows the probability of every expert at that layer.

The page opened with ``#<layer>`` (e.g. ``report.html#L3``) starts at that layer.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mole_lightning.constants import IGNORE_INDEX
from mole_lightning.eval.routing_analysis import SELECTIONS, RoutingCounts, plot_routing_heatmaps
from mole_lightning.peft import iter_routers

PALETTE = ("#a0cbe8", "#ffbe7d", "#8cd17d", "#ff9d9a", "#d4a6c8", "#86bcb6", "#f1ce63", "#fabfd2", "#d7b5a6")
"""Light colours of experts 0..8 (dark text stays readable); more experts get evenly spaced hues."""
PROMPT_CHARS = 120
"""Characters of a prompt shown before the answer (its beginning is elided)."""


@dataclass
class RoutedSample:
    """The routing of one conversation's answer tokens.

    Attributes:
        source: Source name.
        sample_id: The sample's ``id``.
        prompt: Decoded text before the first answer token, image placeholders shown once as ``<image>``.
        pieces: Text of each answer token (multi-turn answers: the text between turns is not kept).
        token_ids: Token id of each answer token.
        experts: LongTensor ``(layers, tokens)``, the top-1 expert of each answer token at each layer.
        probs: FloatTensor ``(layers, tokens, experts)``, the router probabilities.
    """

    source: str
    sample_id: str
    prompt: str
    pieces: list[str]
    token_ids: list[int]
    experts: torch.Tensor
    probs: torch.Tensor


def expert_colours(num_experts: int) -> list[str]:
    """One CSS colour per expert: :data:`PALETTE`, or evenly spaced hues for more experts."""
    if num_experts <= len(PALETTE):
        return list(PALETTE[:num_experts])
    return [f"hsl({round(360 * e / num_experts)}, 70%, 78%)" for e in range(num_experts)]


def token_pieces(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence (prefix differences, so spaces and bytes come out right)."""
    pieces = []
    previous = ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(list(token_ids[:end]), skip_special_tokens=False)
        if text.startswith(previous):
            pieces.append(text[len(previous) :])
        else:  # a multi-byte character split over tokens
            pieces.append(tokenizer.decode([token_ids[end - 1]], skip_special_tokens=False))
        previous = text
    return pieces


def prompt_text(tokenizer: Any, token_ids: Sequence[int], image_token_id: int | None) -> str:
    """Decoded prompt with each run of image placeholders shown once as ``<image>``."""
    parts: list[str] = []
    run: list[int] = []
    previous_image = False
    for token in token_ids:
        is_image = token == image_token_id
        if is_image and not previous_image:
            parts.append(tokenizer.decode(run, skip_special_tokens=False))
            parts.append("<image>")
            run = []
        elif not is_image:
            run.append(token)
        previous_image = is_image
    parts.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)


def sample_routing(
    model: nn.Module, batch: dict[str, Any], rows: Sequence[int], tokenizer: Any, image_token_id: int | None
) -> list[RoutedSample]:
    """Per-token routing of the answer tokens of ``rows`` after ``model`` ran a forward pass on ``batch``.

    Args:
        model: The model that just ran on ``batch`` (its routers hold the forward's records).
        batch: A batch with ``input_ids``, ``labels``, ``source`` and ``id`` (full conversations).
        rows: Batch rows to keep.
        tokenizer: Tokenizer that decodes the token ids.
        image_token_id: Id of the image placeholder token (``None``: no images).

    Returns:
        One :class:`RoutedSample` per row, on the CPU.
    """
    records = [router.record for _, router in iter_routers(model)]
    if not records or any(record is None for record in records):
        raise ValueError("the model's routers hold no record: run a forward pass first")
    input_ids = batch["input_ids"].cpu()
    batch_size, length = input_ids.shape
    experts = torch.stack([r.expert.detach().cpu().view(batch_size, length) for r in records])  # (L, B, S)
    probs = torch.stack([r.probs.detach().float().cpu().view(batch_size, length, -1) for r in records])
    valid = torch.stack([r.valid.detach().cpu().view(batch_size, length) for r in records]).all(0)  # (B, S)
    samples = []
    for row in rows:
        answer = (batch["labels"][row].cpu() != IGNORE_INDEX) & valid[row]
        positions = answer.nonzero().flatten()
        ids = input_ids[row]
        first = int(positions[0]) if len(positions) else int(valid[row].sum())
        prompt_ids = ids[:first][valid[row, :first]].tolist()
        answer_ids = ids[positions].tolist()
        samples.append(
            RoutedSample(
                source=str(batch["source"][row]),
                sample_id=str(batch["id"][row]),
                prompt=prompt_text(tokenizer, prompt_ids, image_token_id),
                pieces=token_pieces(tokenizer, answer_ids),
                token_ids=answer_ids,
                experts=experts[:, row, positions],
                probs=probs[:, row, positions],
            )
        )
    return samples


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure (the figure is left open)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def heatmap_pngs(counts: RoutingCounts, layers_per_figure: int = 8) -> list[tuple[str, str, bytes]]:
    """``[(token type, layer group label, PNG bytes)]`` of the heatmaps of every token type that has tokens."""
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

    pngs = []
    for tokens in SELECTIONS:
        if int(counts.select(tokens).sum()) == 0:
            continue
        for label, figure in plot_routing_heatmaps(counts, tokens, layers_per_figure):
            pngs.append((tokens, label, figure_png(figure)))
            plt.close(figure)
    return pngs


def mutual_information_png(counts: RoutingCounts, weighting: str = "tokens") -> bytes:
    """PNG of MI(source; expert) per layer, one line per token type with tokens, H(source) dashed."""
    import matplotlib  # headless backend chosen at call time, before pyplot draws

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # only once a headless backend is chosen (matplotlib.use("Agg"))

    figure, axis = plt.subplots(figsize=(max(4.0, 0.35 * len(counts.layers) + 2.0), 2.6))
    positions = list(range(len(counts.layers)))
    for tokens in SELECTIONS:
        rows = counts.specialization(tokens, weighting)
        if sum(r["tokens"] for r in rows) == 0:
            continue
        line = axis.plot(positions, [r["mi_bits"] for r in rows], marker="o", markersize=3, label=f"{tokens} tokens")
        if tokens == "all":
            entropy = [r["source_entropy_bits"] for r in rows]
            axis.plot(positions, entropy, linestyle="--", color=line[0].get_color(), linewidth=0.8, label="H(source)")
    axis.set_xticks(positions, counts.layers, fontsize=7, rotation=90 if len(positions) > 16 else 0)
    axis.set_ylabel("bits", fontsize=8)
    axis.set_ylim(bottom=0.0)
    axis.set_title(f"MI(source; expert) per layer ({weighting} weighting)", fontsize=9)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    png = figure_png(figure)
    plt.close(figure)
    return png


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.15em 0.5em; text-align: right; }
th { background: #f4f4f4; } td.name { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.sample { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em 0.8em; margin: 0.6em 0; }
.sample .meta { font-size: 0.8em; color: #666; }
.prompt { color: #888; font-size: 0.85em; white-space: pre-wrap; }
.answer { white-space: pre-wrap; line-height: 1.9; font-family: ui-monospace, monospace; }
.tok { border-radius: 3px; padding: 0.1em 0; border-right: 1px solid #fff; cursor: default; }
.tok:hover { outline: 2px solid #222; }
.legend span { display: inline-block; padding: 0.1em 0.6em; margin-right: 0.4em; border-radius: 3px; }
.controls { position: sticky; top: 0; background: #fff; padding: 0.4em 0; border-bottom: 1px solid #eee; }
"""

PAGE_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("routing-samples").textContent);
  var select = document.getElementById("layer");
  function percent(p) { return (100 * p).toFixed(1) + "%"; }
  function show(layer) {
    var spans = document.querySelectorAll("span.tok");
    for (var i = 0; i < spans.length; i++) {
      var span = spans[i];
      var sample = data.samples[Number(span.dataset.sample)];
      var token = Number(span.dataset.token);
      var expert = sample.experts[layer][token];
      var probs = sample.probs[layer][token];
      var lines = [JSON.stringify(sample.pieces[token]) + " at " + data.layers[layer] + ": expert " + expert];
      for (var e = 0; e < probs.length; e++) { lines.push("e" + e + ": " + percent(probs[e])); }
      span.style.backgroundColor = data.colours[expert];
      span.dataset.expert = String(expert);
      span.title = lines.join("\\n");
    }
    document.body.dataset.layer = data.layers[layer];
  }
  select.addEventListener("change", function () { show(Number(select.value)); });
  var wanted = data.layers.indexOf(decodeURIComponent(window.location.hash.slice(1)));
  if (wanted >= 0) { select.value = String(wanted); }
  select.dispatchEvent(new Event("change"));
  document.body.dataset.ready = "true";
})();
"""


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], attributes: str) -> str:
    """An HTML table; each row is ``(attributes of its <tr>, cells as <td> markup)``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr{row_attributes}>" + "".join(cells) + "</tr>" for row_attributes, cells in rows)
    return f"<table {attributes}><tr>{head}</tr>{body}</table>"


def _mutual_information_section(counts: RoutingCounts, weighting: str) -> str:
    present = [t for t in SELECTIONS if int(counts.select(t).sum()) > 0]
    specialization = {t: counts.specialization(t, weighting) for t in present}
    header = ["layer"] + [f"MI {t} (bits)" for t in present] + [f"MI/H {t}" for t in present]
    rows = []
    for index, layer in enumerate(counts.layers):
        cells = [f'<td class="name">{html.escape(layer)}</td>']
        cells += [f"<td>{specialization[t][index]['mi_bits']:.4f}</td>" for t in present]
        cells += [f"<td>{specialization[t][index]['normalized_mi']:.1%}</td>" for t in present]
        rows.append(("", cells))
    image = png_data_uri(mutual_information_png(counts, weighting))
    return (
        "<h2>Specialization: MI(source; expert) per layer</h2>"
        "<p>Mutual information between a token's source and its top-1 expert, in bits; MI/H divides by H(source) "
        "(0: the expert says nothing about the source, 100%: every source has its own experts).</p>"
        f'<img alt="MI per layer" src="{image}">' + _table(header, rows, 'class="mi"')
    )


def _fraction_table(counts: RoutingCounts, tokens: str) -> str:
    header = ["layer", "source", "tokens"] + [f"e{e}" for e in range(counts.num_experts)]
    rows = []
    for row in counts.fraction_rows():
        if row["token_type"] != tokens:
            continue
        cells = [
            f'<td class="name">{html.escape(row["layer"])}</td>',
            f'<td class="name">{html.escape(row["source"])}</td>',
            f"<td>{row['tokens']}</td>",
        ]
        for expert in range(counts.num_experts):
            value = row[f"expert_{expert}"]
            shade = f"rgba(78, 121, 167, {0.85 * value:.3f})"
            cells.append(f'<td data-value="{value!r}" style="background:{shade}">{value:.3f}</td>')
        rows.append((f' data-layer="{html.escape(row["layer"])}" data-source="{html.escape(row["source"])}"', cells))
    return _table(header, rows, f'class="fractions" data-token-type="{tokens}"')


def _fractions_section(counts: RoutingCounts, heatmaps: Sequence[tuple[str, str, bytes]]) -> str:
    parts = [
        "<h2>Expert fractions per source, image vs text tokens</h2>",
        "<p>Fraction of each source's valid tokens routed to each expert, per layer (rows sum to 1); image tokens "
        "are the image placeholder positions, text tokens all others.</p>",
    ]
    for tokens in SELECTIONS:
        images = [(label, png) for kind, label, png in heatmaps if kind == tokens]
        if not images:
            continue
        parts.append(f"<h3>{tokens} tokens</h3>")
        parts += [f'<img alt="{tokens} tokens {label}" src="{png_data_uri(png)}">' for label, png in images]
        parts.append(f"<details><summary>table</summary>{_fraction_table(counts, tokens)}</details>")
    return "".join(parts)


def _samples_section(samples: Sequence[RoutedSample], layers: Sequence[str], colours: Sequence[str]) -> str:
    options = "".join(f'<option value="{i}">{html.escape(layer)}</option>' for i, layer in enumerate(layers))
    legend = "".join(f'<span style="background:{c}">expert {e}</span>' for e, c in enumerate(colours))
    parts = [
        "<h2>Sample answers coloured by expert</h2>",
        "<p>Each answer token (teacher-forced, as in training) has the colour of its top-1 expert at the chosen "
        "layer; hover a token for the router probabilities of every expert at that layer.</p>",
        f'<div class="controls"><label>layer <select id="layer">{options}</select></label> '
        f'<span class="legend">{legend}</span></div>',
    ]
    source = None
    for index, sample in enumerate(samples):
        if sample.source != source:
            source = sample.source
            parts.append(f"<h3>{html.escape(source)}</h3>")
        prompt = sample.prompt if len(sample.prompt) <= PROMPT_CHARS else "…" + sample.prompt[-PROMPT_CHARS:]
        spans = "".join(
            f'<span class="tok" data-sample="{index}" data-token="{t}">{html.escape(piece)}</span>'
            for t, piece in enumerate(sample.pieces)
        )
        parts.append(
            f'<div class="sample" data-source="{html.escape(sample.source)}" data-id="{html.escape(sample.sample_id)}">'
            f'<div class="meta">{html.escape(sample.sample_id)} · {len(sample.pieces)} answer tokens</div>'
            f'<div class="prompt">{html.escape(prompt)}</div><div class="answer">{spans}</div></div>'
        )
    return "".join(parts)


def _samples_json(samples: Sequence[RoutedSample], layers: Sequence[str], colours: Sequence[str]) -> str:
    data = {
        "layers": list(layers),
        "colours": list(colours),
        "samples": [
            {
                "source": s.source,
                "id": s.sample_id,
                "pieces": s.pieces,
                "token_ids": s.token_ids,
                "experts": s.experts.tolist(),
                "probs": [[[round(p, 4) for p in token] for token in layer] for layer in s.probs.tolist()],
            }
            for s in samples
        ],
    }
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # safe inside <script>


def render_routing_page(
    counts: RoutingCounts,
    samples: Sequence[RoutedSample],
    samples_per_source: dict[str, int],
    weighting: str = "tokens",
    heatmaps: Sequence[tuple[str, str, bytes]] | None = None,
    title: str = "Routing report",
) -> str:
    """The HTML page of a routing analysis (one self-contained document).

    Args:
        counts: The routing counts (:meth:`RoutingAccumulator.result`).
        samples: Routed sample answers (:func:`sample_routing`), grouped by source.
        samples_per_source: Samples counted per source, shown in the header.
        weighting: Source weighting of the MI (``"tokens"`` or ``"uniform"``).
        heatmaps: :func:`heatmap_pngs` output (computed when ``None``).
        title: Page title.
    """
    heatmaps = heatmap_pngs(counts) if heatmaps is None else heatmaps
    colours = expert_colours(counts.num_experts)
    described = ", ".join(f"{html.escape(name)} ({n})" for name, n in samples_per_source.items())
    body = (
        f"<h1>{html.escape(title)}</h1>"
        f"<p>Samples per source: {described}. {len(counts.layers)} MoLE layers, {counts.num_experts} experts, "
        f"{int(counts.counts[:, 0].sum())} tokens per layer.</p>"
        + _mutual_information_section(counts, weighting)
        + _fractions_section(counts, heatmaps)
        + _samples_section(samples, counts.layers, colours)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>{body}"
        f'<script type="application/json" id="routing-samples">{_samples_json(samples, counts.layers, colours)}'
        f"</script><script>{PAGE_SCRIPT}</script></body></html>"
    )
