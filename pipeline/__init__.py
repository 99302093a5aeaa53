"""aigc pipeline: the stage contract, configs, manifests, execution and the `aigc` CLI."""
