"""Stage registrations and configs of the curation package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class CurateConfig:
    """Settings of the `curate` stage. Empty `inputs` means the corpus shipped with aigc."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"
    id_field: str = "id"
    max_docs: int = 0  # 0 = all documents
    max_rejects_fraction: float = 0.5


@dataclasses.dataclass
class TokenizeConfig:
    """Settings of the `tokenize` stage."""

    vocab_size: int = 4096
    valid_fraction: float = 0.05


STAGES = {
    "curate": Stage("curate", CurateConfig, "curation.curate:run"),
    "tokenize": Stage("tokenize", TokenizeConfig, "curation.tokenize:run", inputs=("curate",)),
}
