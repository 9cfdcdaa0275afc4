"""`tf.train.Example` records decoded into numpy, with protobuf's public APIs.

tfds stores each example of a prepared split as a serialized
`tf.train.Example`. baq installs no TensorFlow, and tfds's bundled proto
module is not part of its API, so this module builds the message class itself
from the published wire schema (TensorFlow's `example.proto` and
`feature.proto`: field numbers and types are what the bytes depend on) with
`descriptor_pb2`, a private `DescriptorPool` and
`message_factory.GetMessageClass`.

`decode` turns records into stacked arrays the way tfds encodes a
`tfds.features.Tensor` (`Tensor.encode_example` and tfds's example
serializer):

  * `Encoding.BYTES`: one `bytes_list` value holding the array's raw bytes
    (`ndarray.tobytes()`), read back with `np.frombuffer`;
  * `Encoding.NONE`: the flattened values, integers and booleans in an
    `int64_list`, floats in a `float_list`, cast back to the feature's dtype.

Only static shapes and these two encodings are read (what baq's builders
write); `specs` refuses anything else. tests/test_tf_example.py checks every
field against tfds's own decoder.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
import numpy as np

_PACKAGE = "baq.tf_example"
Spec = tuple[np.dtype, tuple[int, ...]]  # a feature's numpy dtype and shape


def _schema() -> descriptor_pb2.FileDescriptorProto:
  """TensorFlow's Example / Features / Feature / *List messages, field for field."""
  f = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(
      name="baq/tf_example.proto", package=_PACKAGE, syntax="proto3")

  def message(name, *fields):
    m = proto.message_type.add(name=name)
    for field_name, number, kind, type_name, label in fields:
      field = m.field.add(name=field_name, number=number, type=kind, label=label)
      if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    return m

  repeated, optional = f.LABEL_REPEATED, f.LABEL_OPTIONAL
  message("BytesList", ("value", 1, f.TYPE_BYTES, "", repeated))
  message("FloatList", ("value", 1, f.TYPE_FLOAT, "", repeated))
  message("Int64List", ("value", 1, f.TYPE_INT64, "", repeated))
  feature = message("Feature", ("bytes_list", 1, f.TYPE_MESSAGE, "BytesList", optional),
                    ("float_list", 2, f.TYPE_MESSAGE, "FloatList", optional),
                    ("int64_list", 3, f.TYPE_MESSAGE, "Int64List", optional))
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  features = message("Features", ("feature", 1, f.TYPE_MESSAGE,
                                  "Features.FeatureEntry", repeated))
  entry = features.nested_type.add(name="FeatureEntry")  # map<string, Feature>
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=optional)
  entry.field.add(name="value", number=2, type=f.TYPE_MESSAGE, label=optional,
                  type_name=f".{_PACKAGE}.Feature")
  message("Example", ("features", 1, f.TYPE_MESSAGE, "Features", optional))
  return proto


@functools.lru_cache(maxsize=None)
def example_class() -> type:
  """The `tf.train.Example` message class (wire-compatible with TensorFlow's)."""
  pool = descriptor_pool.DescriptorPool()  # baq's own: no clash with tfds or TF
  pool.Add(_schema())
  return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Example"))


def parse(raw: bytes):
  """One serialized `tf.train.Example`, parsed."""
  return example_class().FromString(raw)


def specs(features) -> dict[str, Spec]:
  """The (dtype, shape) of each feature of a tfds `FeaturesDict` of `Tensor`s.

  Args:
    features: `builder.info.features`, flat `tfds.features.Tensor` features
      of static shape, encoded NONE or BYTES.

  Returns:
    feature name -> (numpy dtype, shape), picklable.

  Raises:
    ValueError: a feature this module cannot decode.
  """
  out = {}
  for name in features.keys():
    feature = features[name]
    encoding = feature.to_json_content().encoding  # the public serialized form
    shape = tuple(feature.shape)
    if encoding not in ("", "none", "bytes") or any(d is None for d in shape):
      raise ValueError(f"feature {name!r} ({feature}) is not a static-shape Tensor "
                       "encoded NONE or BYTES.")
    out[name] = (np.dtype(feature.np_dtype), shape)
  return out


def feature_array(values: Sequence, dtype, shape) -> np.ndarray:
  """One feature of many parsed examples (`Feature` messages), stacked.

  Args:
    values: the `Feature` of each example (non-empty).
    dtype: the feature's numpy dtype.
    shape: the feature's static shape.

  Returns:
    [len(values), *shape] array of `dtype`.
  """
  kind = values[0].WhichOneof("kind")
  if kind == "bytes_list":  # Encoding.BYTES: the raw array bytes
    flat = np.frombuffer(b"".join(v.bytes_list.value[0] for v in values), dtype)
  else:
    flat = np.array([getattr(v, kind).value for v in values], dtype)
  return flat.reshape((len(values),) + tuple(shape))


def decode(raws: Iterable[bytes], specs_: Mapping[str, Spec],
           names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """Serialized examples decoded into one stacked array per feature.

  Args:
    raws: serialized `tf.train.Example`s (e.g. array_record records).
    specs_: `specs(features)`.
    names: the features wanted (default: all of `specs_`).

  Returns:
    name -> [n, *shape] array of the feature's dtype, in the order of `raws`.
  """
  names = list(specs_ if names is None else names)
  protos = [parse(r).features.feature for r in raws]
  if not protos:
    return {k: np.zeros((0,) + specs_[k][1], specs_[k][0]) for k in names}
  return {k: feature_array([p[k] for p in protos], *specs_[k]) for k in names}
