"""`LlavaMoLE`: the LLaVA-1.5 architecture with a Mixture-of-LoRA-Experts adapted language model.

Data flow for a batch of B samples, M of which carry an image (text-only samples have none)::

    pixel_values (M, 3, S, S) ── uint8 only: (x/255 − mean)/std, on the device ──> float (M, 3, S, S)
                                 ── vision tower (frozen, layer -2, CLS dropped) ──> (M, N, D_v)
                                 ── projector (trainable, mlp2x_gelu) ─────────> (M, N, D)
    input_ids (B, T) ── embed_tokens ──> (B, T, D); the M*N positions holding the image token id receive the
                                          projected features, in batch order (masked scatter)
    inputs_embeds (B, T, D) ── causal LM with MoLE on every MLP (router mask = attention mask) ──> logits (B, T, V)

``input_ids`` already contain N = ``vision_tower.num_patches`` image-token ids per image (as transformers' LLaVA
processor writes them); the labels of those positions are ``-100``. The loss is transformers' causal-LM loss (shift
by one inside, ``-100`` ignored, fp32); the MoLE auxiliary loss (balance and z-loss) is returned separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from mole_lightning.models.vision import VisionTower
from mole_lightning.peft import apply_mole, collect_aux, routing_mask, routing_statistics
from mole_lightning.pixels import normalize_pixels

ROUTER_KEY = "router"
"""Substring that marks router parameters in the MoLE adapter's parameter names."""


@dataclass
class LlavaMoLEOutput:
    """Output of :meth:`LlavaMoLE.forward`.

    Attributes:
        loss: causal-LM cross-entropy over labels != -100 (transformers' shift), ``None`` without labels.
        logits: next-token logits, shape ``(B, T, V)``.
        aux_loss: weighted MoLE auxiliary loss (balance + z-loss) to add to ``loss``; a zero scalar without MoLE.
        balance_loss: unweighted load-balancing loss (for logging).
        z_loss: unweighted router z-loss (for logging).
        routing_stats: per-layer ``{"tokens_per_expert", "balance", "z_loss"}`` of this forward (padding
            excluded), or ``None`` when not requested or without MoLE.
        source_routing_loss: unweighted source-supervised routing loss (for logging; zero unless
            ``source_routing_coef > 0`` and targets were set with ``peft.source_supervision``), ``None`` without MoLE.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    aux_loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    routing_stats: dict[str, dict[str, Any]] | None = field(default=None)
    source_routing_loss: torch.Tensor | None = None

    @property
    def total_loss(self) -> torch.Tensor:
        """``loss + aux_loss``: the quantity to back-propagate."""
        if self.loss is None:
            raise ValueError("total_loss needs labels")
        return self.loss + self.aux_loss


class _TokenRowsHook:
    """Forward hook putting the trained rows of added tokens (``owner.token_rows[key]``) in place of the frozen
    rows ``owner.token_row_start:`` of an input embedding or an LM head (see ``LlavaMoLE.train_new_token_rows``).

    The rows are looked up on the owner at each call, so the hook follows the parameters FSDP2 swaps in.
    """

    def __init__(self, owner: LlavaMoLE, key: str) -> None:
        self.owner = owner
        self.key = key

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        start = self.owner.token_row_start
        rows = self.owner.token_rows[self.key]
        inputs = args[0] if args else next(iter(kwargs.values()))
        if isinstance(module, nn.Embedding):  # ids (B, T) -> (B, T, D)
            new = (inputs >= start).unsqueeze(-1)
            looked_up = F.embedding((inputs - start).clamp(min=0), rows).to(output.dtype)
            scale = getattr(module, "embed_scale", None)  # scaled embeddings (Gemma) multiply inside forward
            if scale is not None:
                looked_up = looked_up * scale.to(output.dtype)
            return torch.where(new, looked_up, output)
        bias = module.bias[start:] if getattr(module, "bias", None) is not None else None  # hidden (…, D) -> (…, V)
        logits = F.linear(inputs, rows.to(inputs.dtype), None if bias is None else bias.to(inputs.dtype))
        return torch.cat([output[..., :start], logits.to(output.dtype)], dim=-1)


class LlavaMoLE(nn.Module):
    """Vision tower + projector + (MoLE-adapted) causal LM, LLaVA-1.5 style.

    Trainable by default: the projector. :meth:`apply_mole` adds LoRA/experts/routers to the LM (the only LM
    parameters left trainable); :meth:`train_new_token_rows` optionally unfreezes embedding rows of added tokens.
    The vision tower is always frozen.

    Args:
        vision_tower: a frozen :class:`~mole_lightning.models.vision.VisionTower`.
        projector: module mapping ``(…, vision_tower.hidden_size)`` to ``(…, LM hidden size)``.
        language_model: a transformers causal LM (``LlamaForCausalLM`` or any Llama-family model).
        image_token_id: id of the image placeholder token in ``input_ids``.
        projector_type: name the projector was built from (stored for checkpoints).
    """

    def __init__(
        self,
        vision_tower: VisionTower,
        projector: nn.Module,
        language_model: nn.Module,
        *,
        image_token_id: int,
        projector_type: str = "mlp2x_gelu",
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self.projector_type = projector_type
        self.mole_config: Any = None
        self.tokenizer: Any = None  # set by the builders/loaders (tokenizer with the image token)
        # where the frozen weights a meta-device build left unmaterialised are read from (id(param) -> WeightSource;
        # filled by the builders, emptied by shard_and_load once read)
        self.weight_sources: dict[int, Any] = {}
        self.base_model_name_or_path: str | None = None  # the llava-hf folder the model was loaded from, if any
        self.token_row_start: int | None = None
        self._token_row_hooks: list[Any] = []
        self.token_rows = nn.ParameterDict()  # trained rows of added tokens: "input", "output" (untied head)
        self.vision_tower.freeze()
        self.language_model.requires_grad_(False)
        self.projector.requires_grad_(True)

    # ------------------------------------------------------------------ structure
    @property
    def num_image_tokens(self) -> int:
        """N, placeholder tokens per image (= vision features per image)."""
        return self.vision_tower.num_patches

    @property
    def hidden_size(self) -> int:
        """Hidden size D of the language model."""
        return self.language_model.get_input_embeddings().weight.shape[1]

    def apply_mole(self, config: Any) -> LlavaMoLE:
        """Adapt the language model in place with ``mole_lightning.peft.apply_mole``.

        Freezes the LM except LoRA/experts/routers; the projector stays trainable and the vision tower frozen.

        Args:
            config: a ``MoLEConfig``.
        """
        if self.mole_config is not None:
            raise RuntimeError("MoLE adapters are already applied to this model")
        apply_mole(self.language_model, config)
        self.mole_config = config
        self.vision_tower.freeze()
        self.projector.requires_grad_(True)
        return self

    def train_new_token_rows(self, start: int) -> None:
        """Train the embedding rows ``start:`` (tokens added to the vocabulary) and only them.

        The input embedding and LM head weights stay frozen; the trained rows are small parameters of their own,
        ``token_rows.input`` (``(V - start, D)``) and, for an untied head, ``token_rows.output``, initialised from
        the weights' rows and used in their place by forward hooks: for a token id ``i >= start`` the input
        embedding returns ``token_rows.input[i - start]``, and the head's logits ``start:`` are
        ``hidden @ token_rows.output.T`` (``token_rows.input`` when the head is tied to the input embedding). So
        checkpoints and optimizer states hold only the new rows; :meth:`merged_embedding_state` gives the full
        matrices for exports. Calling it again with the same ``start`` keeps the trained rows.

        Args:
            start: first trainable row (the vocabulary size before tokens were added).
        """
        start = int(start)
        for handle in self._token_row_hooks:
            handle.remove()
        self._token_row_hooks = []
        weights = self.embedding_weights()
        for weight in weights:
            weight.requires_grad_(False)
        if self.token_row_start != start or len(self.token_rows) != len(weights):
            rows = {name: nn.Parameter(self._added_rows(w, start)) for name, w in zip(("input", "output"), weights)}
            self.token_rows = nn.ParameterDict(rows)
        self.token_row_start = start
        embed = self.language_model.get_input_embeddings()
        self._token_row_hooks.append(embed.register_forward_hook(_TokenRowsHook(self, "input"), with_kwargs=True))
        head = self.language_model.get_output_embeddings()
        if head is not None:
            key = "output" if "output" in self.token_rows else "input"
            self._token_row_hooks.append(head.register_forward_hook(_TokenRowsHook(self, key), with_kwargs=True))

    def _added_rows(self, weight: torch.Tensor, start: int) -> torch.Tensor:
        """An fp32 copy of the rows ``start:`` of an embedding weight; for a weight on meta (``frozen_on_meta``
        builds) the rows the resize added, kept in its ``weight_sources`` entry."""
        if not weight.is_meta:
            return weight.detach()[start:].to(torch.float32, copy=True)
        source = self.weight_sources.get(id(weight))
        added = getattr(source, "added_rows", None)
        if added is None or added.shape[0] != weight.shape[0] - start:
            raise ValueError(f"the embedding weight is on meta and its rows {start}: are not known")
        return added.to(torch.float32, copy=True)

    def merged_embedding_state(self) -> dict[str, torch.Tensor]:
        """The language model's embedding and LM head weights with the trained token rows in place, keyed as in
        ``language_model.state_dict()`` (``{}`` unless :meth:`train_new_token_rows` is on): what a full export
        writes for them."""
        if self.token_row_start is None:
            return {}
        start = self.token_row_start
        merged = {}
        for weight, name in zip(self.embedding_weights(), ("input", "output")):
            rows = self.token_rows[name].detach().to(weight.dtype)
            merged[id(weight)] = torch.cat([weight.detach()[:start], rows.to(weight.device)])
        return {
            key: merged[id(param)]
            for key, param in self.language_model.named_parameters(remove_duplicate=False)
            if id(param) in merged
        }

    def embedding_weights(self) -> list[nn.Parameter]:
        """The input embedding weight and, when not tied to it, the output (LM head) weight."""
        weights = [self.language_model.get_input_embeddings().weight]
        out = self.language_model.get_output_embeddings()
        if out is not None and out.weight is not weights[0]:
            weights.append(out.weight)
        return weights

    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers."""
        decoder = self.language_model.get_decoder() if hasattr(self.language_model, "get_decoder") else None
        if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            return decoder.layers
        for name, module in self.language_model.named_modules():
            if name.endswith("layers") and isinstance(module, nn.ModuleList):
                return module
        raise ValueError(f"cannot find the decoder layers of {type(self.language_model).__name__}")

    def decoder_layer_classes(self) -> set[type[nn.Module]]:
        """Classes of the LM decoder layers (FSDP wrapping / activation-checkpointing policies)."""
        return {type(layer) for layer in self.decoder_layers()}

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each LM decoder layer in the backward pass (non-reentrant checkpointing)."""
        lm = self.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        """Undo :meth:`gradient_checkpointing_enable`."""
        lm = self.language_model
        if hasattr(lm, "activation_checkpointing_disable"):
            lm.activation_checkpointing_disable()
        else:
            lm.gradient_checkpointing_disable()

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role, each in exactly one (the roles that
        :func:`~mole_lightning.training.optim.parameter_groups` splits into optimizer groups).

        Returns:
            ``{"adapters": LoRA and expert weights, "routers": router weights, "projector": …, "embeddings":
            the trained rows of added tokens (only with :meth:`train_new_token_rows`), "other": anything else
            trainable}``; empty groups are omitted.
        """
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("adapters", "routers", "projector", "embeddings")}
        groups["other"] = []
        seen: set[int] = set()
        for name, param in self.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name.startswith("projector."):
                groups["projector"].append(param)
            elif name.startswith("token_rows."):
                groups["embeddings"].append(param)
            elif name.startswith("language_model.") and ROUTER_KEY in name:
                groups["routers"].append(param)
            elif name.startswith("language_model."):
                groups["adapters"].append(param)
            else:
                groups["other"].append(param)
        return {k: v for k, v in groups.items() if v}

    # ------------------------------------------------------------------ compute
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features.

        Args:
            pixel_values: ``(M, 3, S, S)`` images: uint8 pixels (0..255, as the DataModule sends them), normalised
                here on their device with the tower's mean and std, ``(x / 255 − mean) / std``; or float images
                already normalised, used as given.

        Returns:
            ``(M, N, D)`` features in the projector's dtype (grad flows into the projector only).
        """
        pixel_values = self.vision_input(pixel_values)
        features = self.vision_tower(pixel_values)  # (M, N, D_v), no grad
        proj_param = next(self.projector.parameters(), None)
        if proj_param is not None:
            features = features.to(proj_param.dtype)
        return self.projector(features)  # (M, N, D)

    def vision_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's input: uint8 pixels normalised with the tower's mean and std, float images unchanged."""
        if pixel_values.dtype == torch.uint8:
            return normalize_pixels(pixel_values, self.vision_tower.image_mean, self.vision_tower.image_std)
        return pixel_values

    def image_token_mask(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        has_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean ``(B, T)`` mask of image placeholders, after checking them against the images.

        Raises:
            ValueError: placeholders without ``pixel_values``, ``pixel_values`` without placeholders, a per-sample
                placeholder count that is not a multiple of N, a total that differs from M * N, or a ``has_image``
                flag that disagrees with the placeholders.
        """
        mask = input_ids == self.image_token_id  # (B, T)
        n_tokens = int(mask.sum())
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        per_image = self.num_image_tokens
        if n_tokens and not n_images:
            raise ValueError(
                f"input_ids contain {n_tokens} image placeholder tokens (id {self.image_token_id}) but no "
                "pixel_values were given"
            )
        if n_images and not n_tokens:
            raise ValueError(
                f"pixel_values hold {n_images} images but input_ids contain no image placeholder token "
                f"(id {self.image_token_id}); expand each <image> to {per_image} placeholder tokens"
            )
        per_sample = mask.sum(dim=1)  # (B,)
        bad = (per_sample % per_image).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"sample(s) {bad} hold {per_sample[bad].tolist()} image placeholder tokens, not a multiple of the "
                f"{per_image} features per image (truncated prompt?)"
            )
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"image placeholder tokens and image features do not match: input_ids hold {n_tokens} placeholder "
                f"tokens, pixel_values give {n_images} images x {per_image} features = {n_images * per_image}"
            )
        if has_image is not None:
            has_image = has_image.to(device=per_sample.device, dtype=torch.bool)
            wrong = ((per_sample > 0) != has_image).nonzero().flatten().tolist()
            if wrong:
                raise ValueError(
                    f"has_image disagrees with the image placeholders for sample(s) {wrong}: has_image="
                    f"{has_image[wrong].tolist()}, placeholder counts={per_sample[wrong].tolist()}"
                )
        return mask

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings with image features scattered into the placeholder positions.

        Args:
            input_ids: ``(B, T)`` token ids with N placeholders per image.
            pixel_values: ``(M, 3, S, S)`` images of the samples that have one, in batch order, or ``None``.
            has_image: optional ``(B,)`` bool flags, checked against the placeholders.

        Returns:
            ``(B, T, D)`` embeddings.
        """
        if pixel_values is not None and pixel_values.shape[0] == 0:
            pixel_values = None
        mask = self.image_token_mask(input_ids, pixel_values, has_image)  # (B, T)
        embed_tokens = self.language_model.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(mask, 0))  # (B, T, D); placeholder rows overwritten below
        if pixel_values is not None:
            features = self.encode_images(pixel_values)  # (M, N, D)
            features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # (M*N, D)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features)  # row-major = batch order
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters()):
            # keep the projector in the graph on text-only batches (zero gradient; DDP needs every parameter used)
            probe = self.projector(embeds.new_zeros(1, self.vision_tower.hidden_size, dtype=self._projector_dtype()))
            embeds = embeds + 0.0 * probe.sum().to(embeds.dtype)
        return embeds

    def _projector_dtype(self) -> torch.dtype:
        param = next(self.projector.parameters(), None)
        return param.dtype if param is not None else self.vision_tower.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        return_routing_stats: bool = True,
    ) -> LlavaMoLEOutput:
        """Run the multimodal LM.

        Args:
            input_ids: ``(B, T)`` token ids, each image already expanded to N placeholder tokens.
            attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding; also the router token mask.
            pixel_values: ``(M, 3, S, S)`` images of the samples that have one, in batch order; ``None`` (or M = 0)
                for a text-only batch.
            labels: ``(B, T)`` targets aligned with ``input_ids`` (shifted inside), ``-100`` ignored.
            has_image: optional ``(B,)`` bool flags of samples with an image, checked against the placeholders.
            position_ids: optional ``(B, T)`` positions (default ``0..T-1``).
            return_routing_stats: fill ``routing_stats`` (one device sync per MoLE layer).

        Returns:
            :class:`LlavaMoLEOutput` with ``loss``, ``logits``, ``aux_loss`` and routing statistics.
        """
        inputs_embeds = self.embed(input_ids, pixel_values, has_image)  # (B, T, D)
        lm_kwargs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
        )
        if self.mole_config is None:
            out = self.language_model(**lm_kwargs)
            zero = out.logits.new_zeros((), dtype=torch.float32)
            return LlavaMoLEOutput(loss=out.loss, logits=out.logits, aux_loss=zero, balance_loss=zero, z_loss=zero)

        token_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        with routing_mask(self.language_model, token_mask):
            out = self.language_model(**lm_kwargs)
        aux = collect_aux(self.language_model)
        stats = routing_statistics(self.language_model) if return_routing_stats else None
        return LlavaMoLEOutput(
            loss=out.loss,
            logits=out.logits,
            aux_loss=aux.total,
            balance_loss=aux.balance,
            z_loss=aux.z_loss,
            routing_stats=stats,
            source_routing_loss=aux.source_routing,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> LlavaMoLE:
        """Conversions (``.to(dtype)``, ``.half()``, Lightning's ``bf16-true`` plugin) change the dtype of frozen
        tensors only: trainable ones (adapters, routers, projector; fp32 master weights) keep their dtype, so an
        update smaller than bf16 resolution is not lost. Device moves apply to every tensor. The packed uint8 codes of
        a 4-bit base (QLoRA) are not floating point, so a dtype conversion leaves them (and their quant_state) as they
        are; bitsandbytes' ``Params4bit.to`` moves the quant_state with them."""

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
            if trainable and converted.is_floating_point() and converted.dtype != tensor.dtype:
                return tensor.to(device=converted.device)
            return converted

        return super()._apply(convert, recurse)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """Decode with transformers' ``generate`` and its KV cache; every new token is routed by the MoLE routers.

        The prompt (with image features scattered in) is passed as ``inputs_embeds``; later steps embed the
        generated ids. Use left padding for batched prompts and call ``eval()`` first.

        Args:
            pixel_values: ``(M, 3, S, S)`` images of the prompts that have one, in batch order, or ``None``.
            input_ids: ``(B, T)`` prompt ids with N placeholders per image.
            attention_mask: ``(B, T)`` prompt mask (0 on left padding).
            has_image: optional ``(B,)`` flags, checked against the placeholders.
            **generation_kwargs: passed to ``generate`` (``max_new_tokens``, ``do_sample``, ``eos_token_id``, …).

        Returns:
            ``(B, T + new)`` ids: the prompt followed by the generated tokens (as transformers' LLaVA returns).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Under FSDP2 the root unit (projector, norm; embeddings and LM head unless trained) is gathered by its hook,
        # which generation bypasses: gather it here and free it afterwards (decoder layers gather themselves).
        sharded_root = isinstance(self, FSDPModule)
        if sharded_root:
            self.unshard()
        try:
            inputs_embeds = self.embed(input_ids, pixel_values, has_image)  # (B, T, D)
            return self.language_model.generate(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                **generation_kwargs,
            )
        finally:
            if sharded_root:
                self.reshard()
