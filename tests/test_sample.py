"""The embedded sample of real cells: what it holds, that the default config trains on it, and its rebuild."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import compose_cfg
from leukonet.classes import CLASSES
from leukonet.data import embedded_sample
from leukonet.data.check import duplicate_groups
from leukonet.data.citations import PBC
from leukonet.data.datamodule import CellDataModule
from leukonet.data.folder import scan_folder


def test_the_sample_holds_100_distinct_readable_cells_a_class_with_its_citation() -> None:
    scan = scan_folder(embedded_sample.ROOT)
    assert len(scan.entries) == 500 and not scan.unknown_folders and not scan.ignored_files
    assert [sum(e.label == i for e in scan.entries) for i in range(len(CLASSES))] == [100] * 5
    for e in scan.entries:
        with Image.open(embedded_sample.ROOT / e.path) as im:
            im.load()  # decodes in full
            assert (im.format, im.size, im.mode) == ("JPEG", (224, 224), "RGB"), e.path
    assert duplicate_groups(embedded_sample.ROOT, scan.entries, near=True) == []
    total = sum(f.stat().st_size for f in embedded_sample.ROOT.rglob("*") if f.is_file())
    assert total < 5_000_000
    readme = (embedded_sample.ROOT / "README.md").read_text()
    assert PBC in readme and "CC BY 4.0" in readme and "--check" in readme


def test_the_default_data_is_the_sample_and_synthetic_cells_are_a_choice(tmp_path: Path) -> None:
    cfg = compose_cfg("train", [], tmp_path)
    assert Path(cfg.data.root) == embedded_sample.ROOT
    dm = CellDataModule(root=cfg.data.root)
    assert dm.name == "pbc-sample" and dm.citation == PBC and not dm.is_synthetic
    assert compose_cfg("train", ["data=synthetic"], tmp_path).data.root is None
    assert compose_cfg("train", ["+experiment=demo"], tmp_path).data.root is None  # make demo: drawings
    assert compose_cfg("train", ["data.root=/my/cells"], tmp_path).data.root == "/my/cells"
    sample = compose_cfg("train", ["+experiment=sample"], tmp_path)
    assert sample.model.backbone == "tf_efficientnet_lite0" and sample.model.pretrained
    assert Path(sample.data.root) == embedded_sample.ROOT and sample.callbacks.two_phase.monitor == "val/loss"


def test_the_sample_is_package_data() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["leukonet"]
    assert {"data/sample/README.md", "data/sample/*/*.jpg"} <= set(globs)


@pytest.mark.realdata
def test_the_sample_rebuilds_byte_for_byte_from_pbc(real_data: Path, tmp_path: Path, capsys) -> None:
    assert embedded_sample.main([str(real_data / "pbc-2500"), "--check"]) == 0
    assert "is identical" in capsys.readouterr().out
    # what the check compares (one rebuild is enough: each takes 15-20 s on 2 cores)
    out = shutil.copytree(embedded_sample.ROOT, tmp_path / "sample")
    assert embedded_sample.differences(out, embedded_sample.ROOT) == []
    (out / "basophil" / sorted(p.name for p in (out / "basophil").iterdir())[0]).write_bytes(b"changed")
    assert len(embedded_sample.differences(out, embedded_sample.ROOT)) == 1
    with pytest.raises(ValueError, match="already exists"):
        embedded_sample.build(real_data / "pbc-2500", out)  # never written over
