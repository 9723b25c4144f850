"""The built-in corpus of real recordings: speech, music and sound effects from Debian packages.

Nothing is downloaded at run time: the recordings are files of distribution packages (data card
with sources and licences in docs/data.md). Each source folder is read in sorted order, its
files are decoded to 16 kHz mono, peak-normalised and joined with `GAP_S` of silence into one
stream, which is cut into clips of `CLIP_S` (the last, shorter piece is kept when it is at least
`MIN_CLIP_S` long). Joining matters for the speech prompts, most of which are single words under
2 s: as a stream they read like continuous speech instead of one word tiled along time. Labels
(multi-label in the AudioSet layout, one per clip here): 'speech', 'music', 'sound effect'.

`num_clips` caps the corpus: when the sources give more clips, the `num_clips` with the lowest
SHA-1 of their id are kept (a fixed subset). The corpus goes through the same shard builder as
real data (`synthetic.build_once`).

    apt-get install -y asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav \
      asterisk-core-sounds-fr-wav asterisk-core-sounds-it-wav asterisk-moh-opsound-wav \
      colobot-common-sounds drascula-music sound-theme-freedesktop     # `make deps-real`
    config.data.source = "real"; config.data.synthetic_num_clips = 4096
"""
import dataclasses
import glob
import hashlib
import os
from typing import Iterator, Optional

import numpy as np
import soundfile as sf
import tqdm

from audiomaepp import audio
from audiomaepp.data import sources
from audiomaepp.data import synthetic
from audiomaepp.errors import UserError

SAMPLE_RATE = synthetic.SAMPLE_RATE
CLASSES = ("speech", "music", "sound effect")
CLIP_S = 10.0  # AudioSet's clip length
MIN_CLIP_S = 2.0  # a shorter last piece of a stream is dropped
GAP_S = 0.25  # silence between consecutive files of a stream
# Part of the cache directory name: bump it when the clips change.
CORPUS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Source:
  """One folder of recordings from one Debian package, and what it holds."""
  name: str  # the clips' id prefix
  kind: str  # one of CLASSES
  package: str
  pattern: str  # glob of the folder (the package's install path)

  def folder(self) -> Optional[str]:
    matches = sorted(glob.glob(self.pattern))
    return matches[0] if matches else None


SOURCES = (
    Source("speech-en", "speech", "asterisk-core-sounds-en-wav",
           "/usr/share/asterisk/sounds/en_US_*"),
    Source("speech-es", "speech", "asterisk-core-sounds-es-wav",
           "/usr/share/asterisk/sounds/es_MX_*"),
    Source("speech-fr", "speech", "asterisk-core-sounds-fr-wav",
           "/usr/share/asterisk/sounds/fr_CA_*"),
    Source("speech-it", "speech", "asterisk-core-sounds-it-wav",
           "/usr/share/asterisk/sounds/it_IT_*"),
    Source("music-moh", "music", "asterisk-moh-opsound-wav", "/usr/share/asterisk/moh"),
    Source("music-colobot", "music", "colobot-common-sounds", "/usr/share/games/colobot/music"),
    Source("music-drascula", "music", "drascula-music", "/usr/share/scummvm/drascula/audio"),
    Source("effects-colobot", "sound effect", "colobot-common-sounds",
           "/usr/share/games/colobot/sounds"),
    Source("effects-freedesktop", "sound effect", "sound-theme-freedesktop",
           "/usr/share/sounds/freedesktop/stereo"),
)


def check_sources() -> None:
  """Raises UserError naming the packages to install when a source folder is missing."""
  missing = dict.fromkeys(s.package for s in SOURCES if s.folder() is None)
  if missing:
    packages = " ".join(dict.fromkeys(s.package for s in SOURCES))
    raise UserError(
        f"config.data.source='real' needs the Debian packages {', '.join(missing)}: install them "
        f"with `apt-get install -y {packages}` (`make deps-real`), or use "
        "config.data.source='rich' or 'synthetic'")


def source_files(source: Source) -> list[str]:
  """The audio files of `source`, recursively, in sorted order (symbolic links resolved once)."""
  folder = source.folder()
  files = {os.path.realpath(os.path.join(root, name))
           for root, _, names in os.walk(folder, followlinks=False) for name in names
           if os.path.splitext(name)[1].lower() in sources.AUDIO_EXTENSIONS}
  return sorted(files)


def stream_clips(files: list[str]) -> Iterator[np.ndarray]:
  """Clips of `CLIP_S` cut from the files joined by `GAP_S` of silence (see the module doc).

  Files that do not decode are skipped (the packages' files all decode; a damaged install
  should not stop the corpus).
  """
  clip_len, gap = int(CLIP_S * SAMPLE_RATE), np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
  pending, size = [], 0
  for path in files:
    try:
      waveform = audio.load_audio(path)
    except audio.AudioError:
      continue
    peak = float(np.abs(waveform).max())
    if peak == 0.0:
      continue
    pending += [waveform * (0.9 / peak), gap]
    size += len(waveform) + len(gap)
    while size >= clip_len:
      joined = np.concatenate(pending)
      yield joined[:clip_len]
      pending, size = [joined[clip_len:]], len(joined) - clip_len
  if size >= MIN_CLIP_S * SAMPLE_RATE:
    yield np.concatenate(pending)


def write_corpus(audio_dir: str, num_clips: int, progress: bool = True) -> sources.Sources:
  """Writes the clips (`<source>-<n>.wav`) and the AudioSet-style CSVs; returns the inputs."""
  check_sources()
  os.makedirs(audio_dir, exist_ok=True)
  rows = []
  for source in tqdm.tqdm(SOURCES, desc="real corpus", unit="source", disable=not progress):
    for i, clip in enumerate(stream_clips(source_files(source))):
      ytid = f"{source.name}-{i:05d}"
      sf.write(os.path.join(audio_dir, ytid + ".wav"), clip, SAMPLE_RATE, subtype="PCM_16")
      rows.append((ytid, len(clip) / SAMPLE_RATE, [f"/real/{source.kind}"]))
  kept = sorted(rows, key=lambda row: hashlib.sha1(row[0].encode()).hexdigest())[:num_clips]
  for ytid in {row[0] for row in rows} - {row[0] for row in kept}:
    os.remove(os.path.join(audio_dir, ytid + ".wav"))
  return synthetic.write_audioset_csvs(audio_dir, sorted(kept), [f"/real/{c}" for c in CLASSES],
                                       CLASSES)


def dataset_dir(data_dir: Optional[str] = None, num_clips: int = 4096, seed: int = 0) -> str:
  """Where `build` puts the corpus: the TFDS data_dir to read `audio_logmel` from."""
  del seed  # the recordings are fixed; the argument keeps the built-in corpora's signature
  return os.path.join(data_dir or synthetic.DEFAULT_DIR, f"real-v{CORPUS_VERSION}-{num_clips}")


def build(data_dir: Optional[str] = None, num_clips: int = 4096, seed: int = 0,
          num_workers: Optional[int] = None, progress: bool = True) -> str:
  """Builds the corpus once (clips, then log-mel shards); returns its TFDS data_dir."""
  check_sources()
  root = dataset_dir(data_dir, num_clips, seed)
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  return synthetic.build_once(root, lambda audio_dir: write_corpus(audio_dir, num_clips, progress),
                              num_workers=num_workers, progress=progress)
