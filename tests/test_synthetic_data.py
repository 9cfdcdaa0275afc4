"""Tests of the SYNTHETIC dermatology-like set, its tfds builder and `load`.

They check the numbers the set is designed around: Fitzpatrick17k group
proportions, skin colours inside each type's ITA band, contrast that falls as
skin darkens, exact counterfactual rendering, and seed determinism.
"""

import numpy as np
import pytest

from baq.data import datasets
from baq.data.synthetic import generate as synthetic

BANDS = synthetic.ITA_BANDS


def _lab_of(pixels_uint8):
  return synthetic.srgb_to_lab(np.asarray(pixels_uint8) / 255.0)


def test_group_and_class_proportions_match_fitzpatrick17k():
  groups, lesions, _ = synthetic.sample_records(20_000, 0)
  freq = np.bincount(groups, minlength=6) / len(groups)
  np.testing.assert_allclose(freq, [.184, .300, .207, .174, .096, .040],
                             atol=0.012)
  np.testing.assert_allclose(np.bincount(lesions.label) / len(groups),
                             [.45, .25, .30], atol=0.012)
  # Classes are drawn independently of skin type.
  for g in range(6):
    share = np.mean(lesions.label[groups == g] == 1)
    assert abs(share - 0.25) < 0.05, (g, share)


def test_sampled_skin_is_inside_its_ita_band_and_sane_ranges():
  types = np.repeat(np.arange(6), 500)
  lab = synthetic.sample_skin(types, np.random.default_rng(1))
  angle = synthetic.ita(lab)
  assert np.all(angle >= BANDS[types, 0] - 1e-3)
  assert np.all(angle <= BANDS[types, 1] + 1e-3)
  assert lab[:, 0].min() >= 22 - 1e-3 and lab[:, 0].max() <= 85 + 1e-3
  assert lab[:, 2].min() >= 10 - 1e-3 and lab[:, 2].max() <= 25 + 1e-3
  assert lab[:, 1].min() >= 8 and lab[:, 1].max() <= 15
  # Darker types have lower mean lightness.
  mean_l = [lab[types == t, 0].mean() for t in range(6)]
  assert np.all(np.diff(mean_l) < 0), mean_l


def test_rendered_skin_pixels_have_the_ita_of_their_type():
  types = np.repeat(np.arange(6), 40)
  rng = np.random.default_rng(2)
  lesions = synthetic.sample_lesions(len(types), rng)
  lesions = lesions._replace(dots=np.zeros_like(lesions.dots))
  skin = synthetic.sample_skin(types, rng)
  images = synthetic.render(lesions, skin, 32, nuisance=False)
  mask = synthetic.lesion_mask(lesions, 32)
  corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
  checked = 0
  for i, t in enumerate(types):
    for y, x in corners:
      if mask[i, y, x] == 0:  # Plain skin: no lesion reaches this corner.
        angle = synthetic.ita(_lab_of(images[i, y, x]))
        # uint8 rounding moves ITA by well under a degree.
        assert BANDS[t, 0] - 1.0 <= angle <= BANDS[t, 1] + 1.0, (t, angle)
        checked += 1
  assert checked > 0.9 * 4 * len(types)


def test_lesion_contrast_falls_as_skin_darkens():
  groups, lesions, _ = synthetic.sample_records(120, 3)
  cf = synthetic.counterfactuals(lesions, range(6), seed=0, nuisance=False)
  inside = synthetic.lesion_mask(lesions, 32) > 0.5
  lab = _lab_of(cf["image"])                                  # [6, n, H, W, 3]
  contrast = np.abs(lab[..., 0] - cf["skin_lab"][:, :, None, None, 0])
  per_type = [contrast[t][inside].mean() for t in range(6)]
  assert np.all(np.diff(per_type) < 0), per_type
  assert per_type[0] > 3 * per_type[5], per_type
  # Lesion by lesion, type VI never shows more contrast than type I.
  per_lesion = (contrast * inside).sum((2, 3)) / inside.sum((1, 2))
  assert np.all(per_lesion[5] < per_lesion[0])


def test_counterfactuals_keep_lesion_and_change_only_skin():
  data = synthetic.generate(64, 4, 32)
  lesions = data["lesions"]
  # The records reproduce the images exactly, in any order or chunking.
  again = synthetic.render(lesions, data["skin_lab"], 32, chunk=7)
  np.testing.assert_array_equal(again, data["image"])
  idx = np.array([5, 0, 17])
  np.testing.assert_array_equal(
      synthetic.render(lesions.take(idx), data["skin_lab"][idx], 32),
      data["image"][idx])
  cf = synthetic.counterfactuals(lesions, (0, 5), seed=1, nuisance=False)
  assert cf["image"].shape == (2, 64, 32, 32, 3)
  np.testing.assert_array_equal(cf["label"], data["label"])
  np.testing.assert_array_equal(cf["group"], [0, 5])
  # The lesion sits where its mask says, whatever the skin: without dots
  # (they reach past the border), pixels outside the mask show the plain skin
  # colour on both skins, and every lesion visibly changes its inside.
  mask = synthetic.lesion_mask(lesions, 32)
  clean = synthetic.counterfactuals(
      lesions._replace(dots=np.zeros_like(lesions.dots)), (0, 5), seed=1,
      nuisance=False)
  skin_rgb = np.rint(synthetic.lab_to_srgb(clean["skin_lab"]) * 255)
  shift = np.abs(clean["image"].astype(int)
                 - skin_rgb[:, :, None, None]).max(-1)          # [2, n, H, W]
  assert shift[:, mask == 0].max() <= 1  # uint8 rounding only.
  inside = mask > 0.5
  assert np.all((shift * inside).sum((2, 3)) / inside.sum((1, 2)) > 2)
  skin_l = _lab_of(cf["image"][:, :, 0, 0])[..., 0]
  plain = mask[:, 0, 0] == 0
  assert np.all(skin_l[0][plain] > skin_l[1][plain] + 20)
  # On both skins the lesion is darker than the skin around it.
  lesion_l = _lab_of(cf["image"])[..., 0]
  for t in range(2):
    inner = (lesion_l[t] * (mask > 0.5)).sum((1, 2)) / (mask > 0.5).sum((1, 2))
    assert np.mean(inner < cf["skin_lab"][t, :, 0]) > 0.9


def test_generate_is_deterministic_from_seed():
  a, b = synthetic.generate(40, 7, 16), synthetic.generate(40, 7, 16)
  for key in ("image", "label", "group", "skin_lab"):
    np.testing.assert_array_equal(a[key], b[key])
  c = synthetic.generate(40, 8, 16)
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].dtype == np.uint8 and a["image"].shape == (40, 16, 16, 3)
  # Nuisances (noise, blur, hair, lighting) do change the pixels.
  clean = synthetic.generate(40, 7, 16, nuisance=False)
  assert np.abs(clean["image"].astype(int) - a["image"]).mean() > 1.0


def test_lab_srgb_round_trip():
  lab = np.array([[70, 10, 15], [30, 12, 12], [50, -20, 30]], np.float32)
  np.testing.assert_allclose(synthetic.srgb_to_lab(synthetic.lab_to_srgb(lab)),
                             lab, atol=0.05)
  np.testing.assert_allclose(synthetic.lab_to_srgb(np.array([100., 0, 0])),
                             [1, 1, 1], atol=2e-3)


TINY = dict(image_size=16, num_train=64, num_validation=16, num_test=16,
            seed=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  from baq.data.synthetic import builder as synthetic_builder
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic_builder.make_builder(data_dir, **TINY).download_and_prepare()
  return data_dir


def test_builder_reads_back_exactly_what_generate_produced(tiny_dir):
  from baq.data.synthetic import builder as synthetic_builder
  builder = synthetic_builder.make_builder(tiny_dir, **TINY)
  assert builder.name == "baq_synthetic_derm"
  assert str(builder.version) == "1.0.0"
  assert "SYNTHETIC" in builder.info.description
  sources = builder.as_data_source()
  for k, split in enumerate(("train", "validation", "test")):
    source = sources[split]
    expected = synthetic.generate(TINY[f"num_{split}"], [3, k], 16)
    assert len(source) == len(expected["label"])
    for i in range(len(source)):
      record = source[i]
      assert record["index"] == i
      np.testing.assert_array_equal(record["image"], expected["image"][i])
      assert record["label"] == expected["label"][i]
      assert record["group"] == expected["group"][i]


def test_bulk_read_matches_tfds_decoding(tiny_dir):
  from baq.data import array_records
  from baq.data.synthetic import builder as synthetic_builder
  builder = synthetic_builder.make_builder(tiny_dir, **TINY)
  fast = datasets.read_all(array_records.SplitRecords.of(builder, "train"))
  source = builder.as_data_source(split="train")  # tfds's own decoder
  slow = {k: np.stack([np.asarray(r[k]) for r in source.__getitems__(range(len(source)))])
          for k in fast}
  assert sorted(fast) == sorted(slow) == [
      "group", "image", "index", "label", "skin_lab"]
  for key in slow:
    assert fast[key].dtype == slow[key].dtype, key
    np.testing.assert_array_equal(fast[key], slow[key])
  np.testing.assert_array_equal(fast["index"], np.arange(64))


def test_load_returns_the_split_in_order(tiny_dir):
  split = datasets.load("synthetic_derm", "validation", data_dir=tiny_dir,
                        **TINY)
  expected = synthetic.generate(16, [3, 1], 16)
  np.testing.assert_array_equal(split.images, expected["image"])
  np.testing.assert_array_equal(split.labels, expected["label"])
  np.testing.assert_array_equal(split.groups, expected["group"])
  assert split.labels.dtype == np.int32 and split.groups.dtype == np.int32
  assert (split.num_classes, split.num_groups) == (3, 6)
  assert split.group_names[5] == "VI" and split.class_names[1] == "malignant"
  assert len(split.subset(np.arange(4))) == 4


def test_counterfactual_pairs_match_the_loaded_split(tiny_dir):
  split = datasets.load("synthetic_derm", "train", data_dir=tiny_dir, **TINY)
  pairs = datasets.counterfactual_pairs("train", (0, 5), indices=[3, 9, 1],
                                        **TINY)
  assert pairs["image"].shape == (2, 3, 16, 16, 3)
  np.testing.assert_array_equal(pairs["label"], split.labels[[3, 9, 1]])
  np.testing.assert_array_equal(pairs["original_group"],
                                split.groups[[3, 9, 1]])


def test_load_unknown_dataset_lists_valid_names():
  with pytest.raises(KeyError, match="synthetic_derm"):
    datasets.load("no_such_dataset", "train")
