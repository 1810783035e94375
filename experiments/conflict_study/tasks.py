"""Synthetic conflicting-domain instruction tasks for the data-conflict study.

Every sample has one shared instruction format::

    <bos> [cue] x_1 .. x_L <sep> y_1 .. y_L <eos>          fixed length, no padding

Each input token ``x_i`` shows a content symbol ``s_i`` (one of S) written in one of F "fonts"; the answer token
``y_i = perm_d[s_i]`` is a plain symbol, where ``perm_d`` is the rule of domain ``d`` (a random permutation of the S
symbols, independent across domains: the same input asks for different answers in different domains, a real
conflict). Two ways to tell the domain:

* ``style`` -- every input token carries it, noisily, like an image style: its font is the domain's own font with
  probability ``style_purity`` and one of the other fonts otherwise. No single token identifies the domain; the
  whole input does. There is no cue token.
* ``cue`` -- one cue token after ``<bos>`` names the domain; fonts are uniform (carry nothing).

Stage-0 pretraining uses the same format with the identity rule (copy the symbols) and domain-free signals
(uniform fonts, a random cue among all ``MAX_CUES``), so the base reads fonts and copies, and knows nothing of the
domains.

Answer loss is over the L answer positions (the ``<eos>`` is not scored); since the answer of position i depends on
the input only, "every teacher-forced argmax correct" equals greedy exact match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mole_lightning.constants import IGNORE_INDEX

PAD, BOS, SEP, EOS = 0, 1, 2, 3
NUM_SPECIAL = 4
MAX_CUES = 16
SETTINGS: tuple[str, ...] = ("style", "cue")


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the synthetic task family.

    Attributes:
        setting: ``"style"`` (domain spread over every input token) or ``"cue"`` (one cue token).
        num_domains: D, number of domains (each its own permutation rule).
        num_symbols: S, content symbols; the size of each domain's rule table.
        num_fonts: F, fonts each symbol can be written in (``style`` needs F >= D).
        style_purity: probability that an input token is in its domain's own font (``style`` only).
        length: L, symbols per input (and per answer).
    """

    setting: str = "style"
    num_domains: int = 6
    num_symbols: int = 24
    num_fonts: int = 6
    style_purity: float = 0.5
    length: int = 6

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if not 1 <= self.num_domains <= MAX_CUES:
            raise ValueError(f"num_domains must be in [1, {MAX_CUES}], got {self.num_domains}")
        if self.setting == "style" and self.num_fonts < self.num_domains:
            raise ValueError("the style setting needs num_fonts >= num_domains (one own font per domain)")
        if not 0.0 <= self.style_purity <= 1.0:
            raise ValueError(f"style_purity must be in [0, 1], got {self.style_purity}")

    @property
    def vocab_size(self) -> int:
        """Specials, cue tokens, S*F input tokens and S answer tokens."""
        return NUM_SPECIAL + MAX_CUES + self.num_symbols * self.num_fonts + self.num_symbols

    @property
    def seq_len(self) -> int:
        """Tokens per sample."""
        return 2 * self.length + 3 + (1 if self.setting == "cue" else 0)

    @property
    def answer_start(self) -> int:
        """Position of ``y_1`` in the sequence."""
        return self.seq_len - self.length - 1

    def input_token(self, symbol: torch.Tensor, font: torch.Tensor) -> torch.Tensor:
        """Token id of ``symbol`` written in ``font`` (broadcasting)."""
        return NUM_SPECIAL + MAX_CUES + symbol * self.num_fonts + font

    def answer_token(self, symbol: torch.Tensor) -> torch.Tensor:
        """Token id of the plain answer ``symbol``."""
        return NUM_SPECIAL + MAX_CUES + self.num_symbols * self.num_fonts + symbol

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DomainSet:
    """Samples of one or several domains as fixed-length tensors.

    Attributes:
        input_ids: (N, seq_len) token ids.
        labels: (N, seq_len) next-token targets aligned to ``input_ids`` (HF convention: the model shifts), with
            ``IGNORE_INDEX`` outside the answer symbols.
        domain: (N,) domain index of each sample.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    domain: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index: torch.Tensor) -> DomainSet:
        """Rows ``index`` (a (n,) long tensor or bool mask)."""
        return DomainSet(self.input_ids[index], self.labels[index], self.domain[index])

    @staticmethod
    def concat(parts: list[DomainSet]) -> DomainSet:
        """Union of several sets (row order kept)."""
        return DomainSet(
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.domain for p in parts]),
        )


def domain_rules(task: TaskConfig, seed: int) -> torch.Tensor:
    """(D, S) rule tables: ``rules[d, s]`` is domain d's answer symbol for input symbol s."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(task.num_symbols, generator=gen) for _ in range(task.num_domains)])


def make_samples(
    task: TaskConfig,
    rules: torch.Tensor | None,
    domain: int | None,
    count: int,
    gen: torch.Generator,
) -> DomainSet:
    """``count`` samples of ``domain`` under ``rules``; ``domain=None`` makes stage-0 pretraining samples.

    Args:
        task: the task family.
        rules: (D, S) rule tables (ignored for pretraining samples).
        domain: domain index, or None for the identity rule with domain-free signals.
        count: number of samples.
        gen: random generator (advanced in place).

    Returns:
        The samples, with ``domain`` set to -1 for pretraining samples.
    """
    n, length, num_fonts = count, task.length, task.num_fonts
    symbols = torch.randint(task.num_symbols, (n, length), generator=gen)  # (N, L)
    if domain is not None and task.setting == "style":
        own = torch.rand(n, length, generator=gen) < task.style_purity  # (N, L)
        other = torch.randint(num_fonts - 1, (n, length), generator=gen)  # (N, L) among the F-1 other fonts
        other = other + (other >= domain).long()
        fonts = torch.where(own, torch.full_like(other, domain), other)
    else:
        fonts = torch.randint(num_fonts, (n, length), generator=gen)  # (N, L)
    answers = symbols if domain is None else rules[domain][symbols]  # (N, L)
    columns = [torch.full((n, 1), BOS)]
    if task.setting == "cue":
        cue = torch.randint(MAX_CUES, (n, 1), generator=gen) if domain is None else torch.full((n, 1), domain)
        columns.append(NUM_SPECIAL + cue)
    columns += [task.input_token(symbols, fonts), torch.full((n, 1), SEP), task.answer_token(answers)]
    columns.append(torch.full((n, 1), EOS))
    input_ids = torch.cat(columns, dim=1)  # (N, seq_len)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    start = task.answer_start
    labels[:, start : start + length] = input_ids[:, start : start + length]
    dom = torch.full((n,), -1 if domain is None else domain, dtype=torch.long)
    return DomainSet(input_ids, labels, dom)


def make_domain_sets(task: TaskConfig, rules: torch.Tensor, per_domain: int, seed: int) -> list[DomainSet]:
    """One set of ``per_domain`` samples for each domain, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [make_samples(task, rules, d, per_domain, gen) for d in range(task.num_domains)]
