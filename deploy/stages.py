"""Stage registrations and configs of the deploy package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class ExportConfig:
    """Settings of the `export` stage."""

    model_name: str = "ensemble"


@dataclasses.dataclass
class ServeConfig:
    """Settings of the `serve` stage: start Triton, answer one prompt, stop."""

    prompt: str = "The for statement"
    max_tokens: int = 32
    host: str = "127.0.0.1"


STAGES = {
    "export": Stage("export", ExportConfig, "deploy.export:run", inputs=("align",)),
    "serve": Stage("serve", ServeConfig, "deploy.serve_stage:run", inputs=("export",)),
}
