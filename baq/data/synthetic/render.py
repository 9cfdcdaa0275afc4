"""Pure-numpy renderer of the SYNTHETIC dermatology-like images.

`render` turns lesion records (`baq.data.synthetic.generate.LesionParams`) and CIELAB
skin colours into uint8 sRGB images. Everything is vectorised over images and
pixels; per-lesion randomness (texture, sensor noise) comes from integer
hashes of the lesion's own seed, so a lesion renders identically whatever
batch, chunk or skin colour it is rendered with. That is what makes the
counterfactual pairs of `baq.data.synthetic.generate.counterfactuals` exact.

Colour science is written out here (CIELAB <-> sRGB, D65, and the individual
typology angle) because the set's difficulty is defined in CIELAB: the lesion
shift is scaled by `contrast`, which falls with the skin's ITA.
"""

from __future__ import annotations

import numpy as np

# Contrast multiplier at ITA -60 and at ITA 70, linear in between.
CONTRAST_RANGE = (0.15, 1.0)
# Border harmonics: low orders shape the outline, 11 and 17 make it ragged.
HARMONICS = np.array([1, 2, 3, 4, 5, 6, 11, 17], np.float32)
NUM_BLOBS, NUM_DOTS, NUM_HAIRS = 3, 6, 4
# CIELAB colour shifts at full contrast (dL*, da*, db*).
# Blob tints: black, blue-grey, red, pale (regression).
BLOB_TINTS = np.array([[-30, 0, -6], [-12, -6, -22], [-4, 18, 4],
                       [18, -3, -8]], np.float32)
_DOT_TINT = np.array([-38, 2, 0], np.float32)
_SCALE_TINT = np.array([22, -8, -8], np.float32)   # whitish flakes
_HAIR_LAB = np.array([15, 2, 4], np.float32)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)
_XYZ_TO_RGB = np.array([[3.2404542, -1.5371385, -0.4985314],
                        [-0.9692660, 1.8760108, 0.0415560],
                        [0.0556434, -0.2040259, 1.0572252]], np.float32)


def ita(lab: np.ndarray) -> np.ndarray:
  """Individual typology angle in degrees of CIELAB colours [..., 3]."""
  return np.degrees(np.arctan2(lab[..., 0] - 50, lab[..., 2]))


def contrast(lab: np.ndarray) -> np.ndarray:
  """Lesion contrast multiplier of skin colours: falls as the skin darkens."""
  t = np.clip((ita(lab) + 60) / 130, 0, 1)
  return CONTRAST_RANGE[0] + (CONTRAST_RANGE[1] - CONTRAST_RANGE[0]) * t


def _lab_to_linear(lab_l, lab_a, lab_b):
  """CIELAB (D65) planes to linear sRGB planes in [0, 1], float32."""
  fy = (lab_l + np.float32(16)) / np.float32(116)
  d = np.float32(6 / 29)
  xyz = []
  for f, white in zip((fy + lab_a / np.float32(500), fy,
                       fy - lab_b / np.float32(200)), _D65_WHITE):
    # The cube, continued below 6/29 by its tangent (CIELAB's linear toe);
    # clip and x*x*x are much cheaper than where and ** on large arrays.
    t = np.clip(f, d, None)
    xyz.append((t * t * t + 3 * d * d * np.clip(f - d, None, 0)) * white)
  return [np.clip(m[0] * xyz[0] + m[1] * xyz[1] + m[2] * xyz[2], 0, 1)
          for m in _XYZ_TO_RGB]


def _gamma(rgb):
  """sRGB encoding of linear values in [0, 1]; the linear toe via clip."""
  c = np.float32(0.0031308)
  return (np.float32(1.055) * np.clip(rgb, c, None)**np.float32(1 / 2.4)
          - np.float32(0.055) + np.float32(12.92) * np.clip(rgb - c, None, 0))


# Rendering encodes through a table: a gather is ~3x cheaper than a power, and
# one step (6e-5 in linear light) is far below a uint8 level for skin colours.
_GAMMA_LUT = _gamma(np.linspace(0, 1, 2**14, dtype=np.float32))


def _gamma_fast(rgb):
  idx = (np.clip(rgb, 0, 1) * np.float32(2**14 - 1) + np.float32(0.5))
  return np.take(_GAMMA_LUT, idx.astype(np.int32))


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
  """CIELAB (D65) colours [..., 3] to gamma-encoded sRGB in [0, 1]."""
  lab = np.asarray(lab, np.float32)
  return np.stack([_gamma(c) for c in _lab_to_linear(*np.moveaxis(lab, -1, 0))],
                  -1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB in [0, 1] to CIELAB (D65); the inverse of `lab_to_srgb`."""
  rgb = np.asarray(rgb, np.float64)
  lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055)**2.4)
  t = lin @ np.linalg.inv(_XYZ_TO_RGB.astype(np.float64)).T / _D65_WHITE
  f = np.where(t > (6 / 29)**3, np.cbrt(t), t / (3 * (6 / 29)**2) + 4 / 29)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], -1)


def _hash(x: np.ndarray) -> np.ndarray:
  """A uint32 integer hash (lowbias32); wrapping multiplication is intended."""
  x = np.array(x, np.uint32)
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x7FEB352D)
  x ^= x >> np.uint32(15)
  x *= np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _value_noise(seed, u, v, cells):
  """Smooth noise in [0, 1], [n, H, W], with `cells` lattice cells per unit.

  Hashing (seed, lattice point) rather than drawing from a generator keeps
  each lesion's texture a function of its own record, whatever batch it is
  rendered in.
  """
  gx, gy = (u + 1) * cells, (v + 1) * cells
  ix, iy = np.floor(gx), np.floor(gy)
  fx, fy = [t * t * (3 - 2 * t) for t in (gx - ix, gy - iy)]
  s = _hash(seed)[:, None, None]
  corner = lambda dx, dy: _hash(s ^ _hash(
      (ix + dx).astype(np.uint32) * np.uint32(73856093)
      ^ (iy + dy).astype(np.uint32) * np.uint32(19349663))).astype(
          np.float32) * np.float32(2**-32)
  top = corner(0, 0) * (1 - fx) + corner(1, 0) * fx
  bottom = corner(0, 1) * (1 - fx) + corner(1, 1) * fx
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _grid(size):
  return (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1


def _step(x):
  """A cheap sigmoid: 0 below -2, 1 above 2, smoothstep in between."""
  t = np.clip(x * np.float32(0.25) + np.float32(0.5), 0, 1)
  return t * t * (3 - 2 * t)


def _shape(p, g):
  """Soft lesion mask [n, H, W] in [0, 1] on the 1-D pixel grid `g`."""
  ex = lambda a: a[:, None, None]
  u, v = g[None, None, :], g[None, :, None]
  dx, dy = u - ex(p.center[:, 0]), v - ex(p.center[:, 1])
  cos, sin = ex(np.cos(p.angle)), ex(np.sin(p.angle))
  xr, yr = cos * dx + sin * dy, (cos * dy - sin * dx) / ex(p.aspect)
  r = np.sqrt(xr * xr + yr * yr) + np.float32(1e-6)
  # cos(k theta + phase) from powers of z = exp(i theta): no arctan2, no cos.
  z1 = (xr / r, yr / r)
  mul = lambda a, b: (a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0])
  powers = [z1]
  for _ in range(5):
    powers.append(mul(powers[-1], z1))
  powers.append(mul(powers[5], powers[4]))   # z^11
  powers.append(mul(powers[6], powers[5]))   # z^17
  ca = p.harm_amp * np.cos(p.harm_phase)
  sa = p.harm_amp * np.sin(p.harm_phase)
  wobble = sum(ex(ca[:, k]) * c - ex(sa[:, k]) * s
               for k, (c, s) in enumerate(powers))
  outer = ex(p.radius) * (1 + wobble)
  width = ex(p.radius * p.softness)
  mask = _step((outer - r) / width)
  i = np.flatnonzero(p.ring > 0)
  mask[i] *= _step((r[i] - ex(p.ring[i]) * outer[i]) / width[i])
  i = np.flatnonzero(p.patchy > 0)
  mask[i] *= 1 - ex(p.patchy[i]) * _value_noise(p.seed[i], u, v, 2.5)
  return mask


def lesion_mask(lesions, image_size: int = 32) -> np.ndarray:
  """The soft lesion mask, float32 [n, H, W]; it never depends on the skin."""
  return _shape(lesions, _grid(image_size))


def _spots(p, g, pos, sd, weights):
  """Weighted sums of Gaussian spots: C planes sum_k weights[n, k, c] * spot_k.

  A round Gaussian is separable, so each plane is a batch of tiny matmuls.
  """
  centre = p.center[:, None, :] + pos * p.radius[:, None, None]   # [n, k, 2]
  prof = lambda c: np.exp(-(g[None, :, None] - c[:, None, :])**2 / (2 * sd**2))
  ex, ey = prof(centre[..., 0]), prof(centre[..., 1])             # [n, H, k]
  return [np.matmul(ey * weights[:, None, :, c], ex.transpose(0, 2, 1))
          for c in range(weights.shape[-1])]


def _hair_keep(p, g, size):
  """1 - hair coverage, [n, H, W]: thin dark parabolic arcs, anti-aliased."""
  keep = np.ones((len(p.label), size, size), np.float32)
  for h in range(p.hair_on.shape[1]):
    i = np.flatnonzero(p.hair_on[:, h])
    a, off, curv, extent, width = [x[:, None, None] for x in p.hair_geom[i, h].T]
    u, v = g[None, None, :], g[None, :, None]
    xh = np.cos(a) * u + np.sin(a) * v
    yh = np.cos(a) * v - np.sin(a) * u - off
    dist = np.abs(yh - curv * xh * xh) / np.sqrt(1 + (2 * curv * xh)**2)
    eff = np.maximum(width, np.float32(1 / size))  # Never thinner than a pixel.
    cov = 0.85 * (width / eff) * np.exp(-(dist / eff)**2) * (np.abs(xh) < extent)
    keep[i] *= 1 - cov
  return keep


def _blur(plane, sigma_px):
  """Gaussian blur of [n, H, W] with a per-image sigma, as two matmuls."""
  j = np.arange(plane.shape[1], dtype=np.float32)
  k = np.exp(-(j[:, None] - j[None, :])**2 / (2 * sigma_px[:, None, None]**2))
  k /= k.sum(-1, keepdims=True)  # Renormalised at the edges: no dark rim.
  return np.matmul(np.matmul(k, plane), k.transpose(0, 2, 1))


def _render_chunk(p, skin_lab, size, nuisance):
  """Renders a chunk as three float sRGB planes [n, H, W]."""
  g = _grid(size)
  mask = _shape(p, g)
  blobs = _spots(p, g, p.blob_pos, 0.35 * p.radius[:, None, None],
                 p.variegation[:, None, None] * BLOB_TINTS[p.blob_kind])
  flaky = np.flatnonzero(p.scale > 0)
  flakes = p.scale[flaky, None, None] * np.clip(4 * _value_noise(
      p.seed[flaky] ^ 1, g[None, None, :], g[None, :, None], 10) - 1.8, 0, 1)
  dotty = np.flatnonzero(p.dots > 0)
  dots = _spots(p.take(dotty), g, p.dot_pos[dotty], np.float32(0.04),
                p.dots[dotty, None, None] * _DOT_TINT)
  keep = _hair_keep(p, g, size) if nuisance else 1
  con = contrast(skin_lab)[:, None, None]
  lab = []
  for c in range(3):
    delta = p.tint[:, c, None, None] + blobs[c]
    delta[flaky] += flakes * _SCALE_TINT[c]
    delta *= mask
    delta[dotty] += dots[c]
    plane = skin_lab[:, c, None, None] + con * delta
    lab.append(plane * keep + _HAIR_LAB[c] * (1 - keep))
  linear = _lab_to_linear(*lab)
  if not nuisance:
    return [_gamma_fast(x) for x in linear]
  blurry = np.flatnonzero(p.blur * size > 0.2)   # Sharper images stay sharp.
  idx = np.arange(size * size, dtype=np.uint32).reshape(size, size)
  out = []
  for c, x in enumerate(linear):
    x = _gamma_fast(x * p.light[:, c, None, None])
    x[blurry] = _blur(x[blurry], p.blur[blurry] * size)
    h = _hash(_hash(p.seed + np.uint32(c))[:, None, None] ^ _hash(idx))
    # Two 16-bit uniforms per hash: their sum is triangular, std 1/sqrt(6).
    tri = ((h & np.uint32(0xFFFF)) + (h >> np.uint32(16))).astype(
        np.float32) * np.float32(2**-16) - 1
    out.append(x + np.float32(np.sqrt(6)) * p.noise[:, None, None] * tri)
  return out


def render(lesions, skin_lab: np.ndarray, image_size: int = 32,
           nuisance: bool = True, chunk: int = 128) -> np.ndarray:
  """Renders each lesion on its skin colour.

  Args:
    lesions: `LesionParams` with leading dimension n.
    skin_lab: float [n, 3] CIELAB skin colours (see `sample_skin`).
    image_size: output height and width in pixels.
    nuisance: if False, no hair, lighting, blur or sensor noise (clean skin
      pixels then have exactly the sampled colour, up to uint8 rounding).
    chunk: images rendered at once; bounds peak memory.

  Returns:
    uint8 [n, image_size, image_size, 3] sRGB images.
  """
  skin_lab = np.asarray(skin_lab, np.float32)
  out = np.empty((len(skin_lab), image_size, image_size, 3), np.uint8)
  for i in range(0, len(skin_lab), chunk):
    planes = _render_chunk(lesions.take(slice(i, i + chunk)),
                           skin_lab[i:i + chunk], image_size, nuisance)
    for c, x in enumerate(planes):
      out[i:i + chunk, ..., c] = np.clip(np.rint(x * 255), 0, 255)
  return out
