"""Co-Erasing: the concept described by text and by images the original model generates for it.

Stage 1 is ESD on the text. Stage 2 is ESD again on the stage-1 model (now the frozen teacher), with the
condition [text tokens ; image tokens]: the image tokens come from an image encoder through a projection into
the text encoder's space and, with text guidance, are refined as softmax(Q K^T / sqrt(d)) V with Q the
projected image tokens and K = V the concept word's token states, so only the visual features related to the
word remain. The image branch exists only while training: the delta is an ordinary text-conditioned model.

Image encoders (finetune.image_tokens): `testbed`, or for Stable Diffusion an IP-Adapter folder the user gives
(`--set image_encoder=PATH`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..concepts import ConceptSpec
from ..delta import Delta
from ..model import Model
from . import esd
from .image_tokens import image_encoder
from .loop import no_lora, record, rollout_noise, train_and_restore
from .params import Frozen, select

TESTBED = {**esd.TESTBED, "images": 32}


@dataclass
class CoErasingConfig(esd.ESDConfig):
    images: int = 200  # generated concept images used in stage 2 (reference: 500 generated, 100-200 used)
    text_guided: bool = True
    image_encoder: str = "testbed"  # or an IP-Adapter folder (image_encoder/ and ip-adapter*.safetensors)
    allow_pickle_weights: bool = False  # also read an IP-Adapter's pickled .bin weights (they can run code)
    stage1_steps: int = 0  # 0: the same number of steps as stage 2


def concept_prompts(model: Model, spec: ConceptSpec, n: int) -> tuple[list[str], list[int]]:
    """Prompts and seeds for the concept images: the testbed's canonical concept prompts, else
    'a photo of {concept}' with seeds 0..n-1 per concept."""
    if model.world is not None:
        out = [p for t in spec.targets for p in model.world.concept_prompts(t.name, "canonical", n, seed=7000)]
        return [p.text for p in out], [p.seed for p in out]
    texts = [f"a photo of {t.name}" for t in spec.targets for _ in range(n)]
    return texts, list(range(len(texts)))


def refine(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Text-guided refinement: (N, T, d) image tokens -> convex combinations of the word states (W, d)."""
    scores = tokens @ words.T / words.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ words


class CoErasingLoss(esd.ESDLoss):
    """ESD's objective with the condition [text ; image tokens] for the trained model and the teacher."""

    def __init__(self, model, pairs, frozen, cfg, image_tokens: torch.Tensor, keep: list[str] | None = None):
        super().__init__(model, pairs, frozen, cfg, keep)
        self.image_tokens = image_tokens.to(model.device, model.dtype)

    def __call__(self, step: int, gen: torch.Generator):
        m, cfg = self.model, self.cfg
        i = int(torch.randint(0, len(self.cond), (1,), generator=gen))
        j = int(torch.randint(0, len(self.image_tokens), (1,), generator=gen))
        k = int(torch.randint(0, cfg.sampler_steps, (1,), generator=gen))
        noise = rollout_noise(m, cfg, gen)
        c = self.cond[i:i + 1]
        x_t, t = self.frozen.rollout(c, self.uncond, noise, cfg.sampler_steps, k, cfg.guidance)
        joint = m.extend_context(c, self.image_tokens[j:j + 1])
        reference = m.extend_context(self.reference(i), torch.zeros_like(self.image_tokens[j:j + 1]))
        e0, ec = self.frozen.pair(x_t, t, joint, reference)
        target = e0 - cfg.eta * (ec - e0)
        loss = torch.nn.functional.mse_loss(m.raw(x_t, t, joint).float(), target.float())
        return loss + self.preserve(x_t, t, gen), {"k": k}


def _word_states(model: Model, spec: ConceptSpec) -> torch.Tensor:
    enc = model.encode([t.name for t in spec.targets])
    rows = [enc.embeddings[i][1:int(enc.eot[i])] for i in range(len(spec.targets))]  # content tokens only
    return torch.cat(rows).float()


def erase(model: Model, spec: ConceptSpec, cfg: CoErasingConfig | None = None,
          base_values: dict | None = None) -> Delta:
    cfg = cfg or CoErasingConfig()
    model.require("co-erasing")
    no_lora(cfg, "co-erasing")
    encoder = image_encoder(cfg.image_encoder, model, allow_pickle=cfg.allow_pickle_weights)
    stage1_cfg = replace(cfg, steps=cfg.stage1_steps or cfg.steps,
                         run_dir=f"{cfg.run_dir}/stage1" if cfg.run_dir else "")
    stage1 = esd.erase(model, spec, stage1_cfg)
    texts, seeds = concept_prompts(model, spec, cfg.images)
    with torch.no_grad():
        # the original model's images of the concept, on the schedule the settings give (sampler_steps)
        images = model.sample(texts, seeds, steps=cfg.sampler_steps, progress=False)
        tokens = encoder(images)
        if cfg.text_guided:
            tokens = refine(tokens, _word_states(model, spec).to(tokens.device))
    old = stage1.apply(model, check=False)
    try:
        named = select(model, cfg.parameters)
        frozen = Frozen(model, named)
        loss = CoErasingLoss(model, spec.pairs(), frozen, cfg, tokens, spec.preserve_prompts())
        config = {**{k: v for k, v in asdict(cfg).items() if k not in record(cfg)}, "loop": record(cfg),
                  "spec": spec.to_dict()}
        stage2_cfg = replace(cfg, run_dir=f"{cfg.run_dir}/stage2" if cfg.run_dir else "")
        new = train_and_restore(model, named, frozen, loss, stage2_cfg, {"method": "co-erasing", "config": config})
    finally:
        Delta.revert(model, old)
    merged = {**stage1.tensors, **new}
    return Delta.from_changes(model, merged, "co-erasing", config,
                              {"images": len(images), "image_steps": cfg.sampler_steps,
                               "image_tokens": list(tokens.shape[1:]), "tensors": len(merged)})
