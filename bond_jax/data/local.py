"""TFDS builders of data that is already on this machine (a PyPI package's files, local JSON lines).

A `LocalBuilder` subclass gives its DESCRIPTION, its `_features()` and its generators; `prepare` builds it
once as array_record (a finished dataset is reused) with no TensorFlow and nothing downloaded.
"""

from __future__ import annotations

import abc

import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose data ships with the machine: version 1.0.0, one description, features from
  `_features()`, and counts in `info.metadata`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = ""

  @abc.abstractmethod
  def _features(self) -> tfds.features.FeaturesDict:
    """The example features of the dataset."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=self._features(),
                                 metadata=tfds.core.MetadataDict())


def prepare(builder_cls: type[tfds.core.GeneratorBasedBuilder], data_dir: str,
            config: tfds.core.BuilderConfig | None = None) -> tfds.core.GeneratorBasedBuilder:
  """Builds (once; a finished dataset in `data_dir` is reused) as array_record and returns the builder.

  Read a split with `builder.as_data_source(split)`; metadata (counts) is `builder.info.metadata`.
  """
  kwargs = {"config": config} if config is not None else {}
  builder = builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)
  builder.download_and_prepare()
  return builder
