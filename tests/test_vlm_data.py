"""baq.data.vlm: the FairFace and FACET loaders on tiny folders written to tmp_path
(solid-colour PIL images whose colour encodes the row; FACET person boxes
painted in their own colour), their errors, box crops, and the SYNTHETIC
image-caption set."""

import csv
import json
import os

import numpy as np
from PIL import Image
import pytest

from baq.data import vlm
from baq.data.manual.files import UnreadableImageError
from baq.data.synthetic import generate as synth
from baq.data.vlm import facet, fairface, synthetic


def _colour(i):
  return (20 + 40 * (i % 6), 30 * (i // 6) + 10, 200 - 15 * i)


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


# FairFace: 6 val images; row i is colour i.
FAIRFACE_ROWS = [  # age, gender, race, service_test
    ("20-29", "Male", "White", "True"), ("0-2", "Female", "Black", "False"),
    ("more than 70", "Female", "East Asian", "True"),
    ("3-9", "Male", "Middle Eastern", "False"),
    ("50-59", "Female", "Latino_Hispanic", "True"), ("10-19", "Male", "Indian", "False")]


@pytest.fixture(name="fairface_dir")
def _fairface_dir(tmp_path):
  os.makedirs(tmp_path / "val")
  for i in range(len(FAIRFACE_ROWS)):
    Image.new("RGB", (12, 12), _colour(i)).save(tmp_path / "val" / f"{i + 1}.png")
  _write_csv(tmp_path / "fairface_label_val.csv", fairface.COLUMNS,
             [(f"val/{i + 1}.png",) + r for i, r in enumerate(FAIRFACE_ROWS)])
  return tmp_path


def test_fairface_paths_codes_and_images(fairface_dir):
  paths, attributes, names = vlm.load_fairface(str(fairface_dir), "val")
  assert paths == [str(fairface_dir / "val" / f"{i + 1}.png") for i in range(6)]
  np.testing.assert_array_equal(attributes["age"], [3, 0, 8, 1, 6, 2])
  np.testing.assert_array_equal(attributes["gender"], [0, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(attributes["race"], [0, 1, 3, 6, 2, 5])
  for key, column in (("age", 0), ("gender", 1), ("race", 2)):
    assert [names[key][c] for c in attributes[key]] == [r[column] for r in FAIRFACE_ROWS]
  images = vlm.read_images(paths, 4)
  assert images.shape == (6, 4, 4, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[:, 2, 1], [_colour(i) for i in range(6)])
  subset = vlm.load_fairface(str(fairface_dir), service_test=True)
  assert subset.paths == [paths[i] for i in (0, 2, 4)]
  np.testing.assert_array_equal(subset.attributes["race"], [0, 3, 2])


def test_fairface_errors_name_what_is_wrong(fairface_dir, tmp_path_factory):
  other = tmp_path_factory.mktemp("ff")
  with pytest.raises(FileNotFoundError, match="fairface_label_train.csv"):
    vlm.load_fairface(str(fairface_dir), "train")
  _write_csv(other / "fairface_label_val.csv", ("file", "age", "gender"), [("val/1.png", "0-2",
                                                                            "Male")])
  with pytest.raises(ValueError, match="lacks column.*race, service_test"):
    vlm.load_fairface(str(other))
  with pytest.raises(ValueError, match="valid values: 'train', 'val'"):
    vlm.load_fairface(str(fairface_dir), "test")
  os.remove(fairface_dir / "val" / "4.png")
  with pytest.raises(FileNotFoundError, match=r"1 of 6 images.*line 5: val/4\.png"):
    vlm.load_fairface(str(fairface_dir))
  kept = vlm.load_fairface(str(fairface_dir), missing_images="skip")
  np.testing.assert_array_equal(kept.attributes["race"], [0, 1, 3, 2, 5])
  rows = [(f"val/{i + 1}.png",) + r for i, r in enumerate(FAIRFACE_ROWS)]
  rows[1] = rows[1][:3] + ("Martian", "False")
  _write_csv(fairface_dir / "fairface_label_val.csv", fairface.COLUMNS, rows)
  with pytest.raises(ValueError, match=r"line 3 \(val/2\.png\): race 'Martian'"):
    vlm.load_fairface(str(fairface_dir), missing_images="skip")


def test_bad_image_is_named(fairface_dir):
  bad = fairface_dir / "val" / "2.png"
  bad.write_bytes(b"not an image")
  paths = vlm.load_fairface(str(fairface_dir)).paths  # lazy: presence only
  with pytest.raises(UnreadableImageError, match="2.png"):
    vlm.read_images(paths, 4)
  with pytest.raises(UnreadableImageError, match="2.png"):
    vlm.read_images(paths, 4, boxes=np.tile([0, 0, 4, 4], (6, 1)))


# FACET: person -> (file, folder, class1, box, gender votes masc/fem/nb/na,
# MST votes {tone: count}, skin_tone_na, age votes young/middle/older/na,
# expected gender, skin and age codes).
PERSONS = [
    ("sa_1.png", "imgs_1", "guitarist", (2, 3, 10, 8), (1, 0, 0, 0), {2: 1}, 0, (1, 0, 0, 0),
     0, 0, 0),
    ("sa_1.png", "imgs_1", "doctor", (20, 10, 12, 15), (0, 1, 0, 0), {3: 1, 4: 1}, 0,
     (0, 0, 1, 0), 1, 1, 2),
    ("sa_2.png", "imgs_2", "guitarist", (0, 0, 40, 30), (0, 0, 1, 0), {7: 2, 8: 1}, 0,
     (0, 1, 0, 0), 2, 2, 1),
    ("sa_3.png", "imgs_3", "nurse", (5, 5, 20, 20), (0, 0, 0, 1), {}, 1, (0, 0, 0, 1),
     3, 3, 3),
    ("sa_3.png", "imgs_3", "doctor", (25, 2, 30, 40), (1, 1, 0, 0), {1: 1, 9: 1}, 0,
     (0, 0, 0, 0), 3, 1, 3),
]


def _facet_rows():
  rows = []
  for pid, (name, _, cls, box, gender, tones, tone_na, age, *_) in enumerate(PERSONS):
    box_json = json.dumps(dict(zip(("x", "y", "width", "height"), map(float, box))))
    rows.append([str(pid), name, cls, "", box_json, *gender,
                 *[tones.get(t, 0) for t in range(1, 11)], tone_na, *age])
  header = (["person_id", "filename", "class1", "class2", "bounding_box"]
            + list(facet.REQUIRED_COLUMNS[4:]))
  return header, rows


@pytest.fixture(name="facet_dir")
def _facet_dir(tmp_path):
  pixels = {}
  for pid, (name, folder, _, (x, y, w, h), *_) in enumerate(PERSONS):
    img = pixels.setdefault((folder, name), np.zeros((50, 60, 3), np.uint8))
    img[y:y + h, x:x + w] = _colour(pid)
  for (folder, name), img in pixels.items():
    os.makedirs(tmp_path / folder, exist_ok=True)
    Image.fromarray(img).save(tmp_path / folder / name)
  _write_csv(tmp_path / "annotations.csv", *_facet_rows())
  return tmp_path


def test_facet_attributes_boxes_and_crops(facet_dir):
  data = vlm.load_facet(str(facet_dir))
  assert data.paths == [str(facet_dir / p[1] / p[0]) for p in PERSONS]
  np.testing.assert_array_equal(data.boxes, [p[3] for p in PERSONS])
  assert data.classes == [p[2] for p in PERSONS]
  assert data.class_names == ["doctor", "guitarist", "nurse"]
  np.testing.assert_array_equal(data.labels, [1, 0, 1, 2, 0])
  for key, column in (("gender", 8), ("skin_tone", 9), ("age", 10)):
    np.testing.assert_array_equal(data.attributes[key], [p[column] for p in PERSONS], key)
  assert data.names["skin_tone"] == ["lighter", "middle", "darker", "na"]
  assert data.names["gender"][-1] == data.names["age"][-1] == "na"
  assert data.skin_tone_votes[2].tolist() == [0] * 6 + [2, 1, 0, 0]
  crops = vlm.read_images(data.paths, 6, boxes=data.boxes)
  for pid, crop in enumerate(crops):  # each crop is its person's colour only
    np.testing.assert_array_equal(crop.reshape(-1, 3), np.tile(_colour(pid), (36, 1)))
  whole = vlm.read_images(data.paths[:1], 10)
  assert (whole[0] == 0).all(axis=-1).mean() > 0.5  # mostly background


def test_facet_errors_name_what_is_wrong(facet_dir, tmp_path_factory):
  header, rows = _facet_rows()
  drop = [header.index("skin_tone_10"), header.index("age_presentation_na")]
  _write_csv(facet_dir / "annotations.csv", [h for i, h in enumerate(header) if i not in drop],
             [[v for i, v in enumerate(r) if i not in drop] for r in rows])
  with pytest.raises(ValueError, match="lacks column.*skin_tone_10, age_presentation_na"):
    vlm.load_facet(str(facet_dir))
  rows[2][4] = "not a box"
  _write_csv(facet_dir / "annotations.csv", header, rows)
  with pytest.raises(ValueError, match=r"line 4 \(person 2\): bounding_box"):
    vlm.load_facet(str(facet_dir))
  _write_csv(facet_dir / "annotations.csv", *_facet_rows())
  os.remove(facet_dir / "imgs_2" / "sa_2.png")
  with pytest.raises(FileNotFoundError, match=r"line 4: sa_2\.png \(person 2\)"):
    vlm.load_facet(str(facet_dir))
  kept = vlm.load_facet(str(facet_dir), missing_images="skip")
  assert kept.person_ids == ["0", "1", "3", "4"]
  empty = tmp_path_factory.mktemp("facet")
  with pytest.raises(FileNotFoundError, match="missing annotations.csv"):
    vlm.load_facet(str(empty))
  _write_csv(empty / "annotations.csv", *_facet_rows())
  with pytest.raises(FileNotFoundError, match="imgs_1, imgs_2, imgs_3"):
    vlm.load_facet(str(empty))
  with pytest.raises(ValueError, match="outside the 60x50 image"):
    vlm.read_images(kept.paths[:1], 4, boxes=np.array([[70.0, 0, 5, 5]]))


def test_box_crop_of_a_large_jpeg_uses_a_reduced_decode(tmp_path):
  img = np.zeros((300, 400, 3), np.uint8)
  img[50:250, 100:300] = (200, 60, 30)
  Image.fromarray(img).save(tmp_path / "big.jpg", quality=95)
  crop = vlm.read_images([str(tmp_path / "big.jpg")], 16, boxes=np.array([[110.0, 60, 180, 180]]))
  np.testing.assert_allclose(crop[0].reshape(-1, 3).mean(0), (200, 60, 30), atol=6)


def test_synthetic_set_is_deterministic_captioned_and_grouped():
  a, b = synthetic.generate(0, 120, 8), synthetic.generate(0, 120, 8)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.captions == b.captions and "SYNTHETIC" in a.info["kind"]
  c = synthetic.generate(1, 120, 8)
  assert not np.array_equal(a.images, c.images)
  drawn = synth.generate(120, [0, 10], 8)  # the renderer's own API, same stream
  np.testing.assert_array_equal(a.images, drawn["image"])
  np.testing.assert_array_equal(a.labels, drawn["label"])
  np.testing.assert_array_equal(a.skin_type, drawn["group"])
  assert a.images.shape == (120, 8, 8, 3) and a.images.dtype == np.uint8
  assert a.class_names == ("benign", "malignant", "non_neoplastic")
  assert a.class_prompts[1][0] == "a dermoscopic image of a malignant lesion"
  for label, template, caption in zip(a.labels, a.caption_template, a.captions):
    assert caption == a.class_prompts[label][template]
    assert synthetic.CLASS_PHRASES[a.class_names[label]] in caption
  assert set(a.labels.tolist()) == {0, 1, 2}
  assert len(set(a.skin_type.tolist())) >= 5 and len(set(a.caption_template.tolist())) == 4
  for query in a.neutral_queries:
    assert not any(p in query for p in ("benign", "malignant", "neoplastic", "type"))
  assert "a dermoscopic image of a lesion" in a.neutral_queries
