"""The generative-model zoo: one registered stage `zoo_<recipe>` per model family, on the t2i caption set.

Light package: importing it (and `registry`, the `*_config` modules) pulls no torch;
the recipes' modules (`likelihood`, `gans`, `flows`) and `common` are imported only when
a stage runs or samples.
"""
