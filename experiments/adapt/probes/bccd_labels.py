"""Do BCCD's per-image labels name the cell in each crop? (issue 17's README named it as a possible cause of the gap)

BCCD's class labels are per field (image), not per cell (../shared/data/README.md: 344 fields hold one leukocyte box,
14 two, 6 none). A crop cut from a field with two leukocytes of different classes would carry the wrong label for one
of them. This counts, for every crop in bccd-crops/ (one per field, ``<field>_1.jpg``), the leukocyte boxes of its
field in bccd-fields/Annotations (BCCD Dataset, MIT licence), and lists the crops whose field is not one box.

    python experiments/adapt/probes/bccd_labels.py ../shared/data   # a second; bccd_labels.json
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def boxes(annotation: Path) -> list[list[int]]:
    """The WBC boxes of one Pascal VOC file: [xmin, ymin, xmax, ymax] each."""
    root = ET.parse(annotation).getroot()
    return [[round(float(o.find(f"bndbox/{k}").text)) for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in root.findall("object") if o.find("name").text.strip().upper() == "WBC"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="the folder holding bccd-crops/ and bccd-fields/")
    p.add_argument("--out", type=Path, default=HERE / "bccd_labels.json")
    args = p.parse_args(argv)
    fields = {a.stem: boxes(a) for a in sorted((args.data / "bccd-fields" / "Annotations").glob("*.xml"))}
    crops = {c.name.rsplit("_", 1)[0]: (c.parent.name, c.name) for c in sorted((args.data / "bccd-crops").glob("*/*.jpg"))}
    count = {field: len(fields[field]) if field in fields else None for field in crops}
    odd = {f"{cls}/{name}": {"field": field, "wbc_boxes": fields.get(field)}
           for field, (cls, name) in sorted(crops.items()) if count[field] != 1}
    result = {
        "crops": len(crops),
        "crops_by_boxes_in_their_field": {("no annotation" if k is None else str(k)): v
                                          for k, v in sorted(Counter(count.values()).items(), key=lambda kv: str(kv[0]))},
        "fields_with_two_or_more_boxes": sum(len(b) >= 2 for b in fields.values()),
        "of_those_with_a_crop": sum(len(fields[f]) >= 2 for f in crops if f in fields),
        "crops_not_from_a_one_box_field": odd,
        "command": "python experiments/adapt/probes/bccd_labels.py ../shared/data",
        "source": "BCCD Dataset (MIT licence): bccd-crops and bccd-fields/Annotations",
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "crops_not_from_a_one_box_field"}, indent=1))
    return result


if __name__ == "__main__":
    main()
