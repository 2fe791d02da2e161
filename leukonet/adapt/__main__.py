"""``python -m leukonet.adapt ckpt_path=RUN/checkpoints/last.ckpt target.root=DIR [target.labels=CSV] [method=NAME]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from leukonet.adapt.run import adapt
from leukonet.errors import exit_on_user_error
from leukonet.train import CONF


@hydra.main(version_base="1.3", config_path=CONF, config_name="adapt")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: adapt(cfg))


if __name__ == "__main__":
    main()
