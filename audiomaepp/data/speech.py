"""Synthetic speech for the built-in corpus: espeak-ng utterances in many voices and languages.

Each utterance is drawn from a NumPy generator: a language, a voice variant, a rate and a pitch,
and a text: random English words, a string of digits, a sentence from templates, or (for the
other languages) made-up words of that language's syllables. The ten keywords of the evaluation
suite's kws task are never spoken (`EXCLUDED_WORDS`), so pretraining shares no text with it.
"""
import io
import shutil
import subprocess

import numpy as np
from scipy import signal
import soundfile as sf

from audiomaepp.audio import io as audio_io

SAMPLE_RATE = audio_io.SAMPLE_RATE
EXECUTABLE = "espeak-ng"

# The keywords of ../shared/evalsuite/make_suite.py's kws task: never part of the corpus's text.
EXCLUDED_WORDS = frozenset({"yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"})

LANGUAGES = ("en", "en-us", "en-gb-scotland", "de", "fr-fr", "es", "it", "pt", "nl", "sv", "pl",
             "cs", "ru", "el", "tr", "fi", "hu", "ro", "hi", "id", "sw", "cy", "da", "hr")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "Alex", "Andy", "Annie", "Denis", "Gene", "Hugo", "Jacky", "Lee", "Michael", "Mike",
            "Storm", "adam", "anika", "aunty", "belinda", "benjamin", "boris", "caleb", "david",
            "ed", "edward", "grandma", "grandpa", "john", "klatt", "klatt2", "klatt3", "linda",
            "max", "norbert", "paul", "quincy", "rob", "robert", "shelby", "steph", "travis",
            "victor", "zac")

_WORDS = tuple(w for w in """
  apple river mountain window garden yellow purple orange silver music table chair pencil paper
  water coffee morning evening winter summer autumn spring forest island ocean desert thunder
  rainbow candle basket blanket bottle button camera castle circle cloud corner cotton dinner
  doctor dragon engine factory farmer feather finger flower friend future giant guitar hammer
  harbor helmet hollow honey hunter jacket jungle kettle kitchen ladder lemon letter lion market
  meadow mirror monkey motor needle number office onion palace parrot pepper pillow planet pocket
  rabbit rocket saddle school shadow shelter silk sister soldier spider station stone sugar
  tiger timber tomato tower travel tunnel turtle valley velvet village violin wagon walnut
  whistle wizard wonder zebra quickly slowly happy gentle bright narrow heavy simple quiet
  brave clever distant empty famous golden hidden lonely modern nervous polite rapid secret
  """.split() if w not in EXCLUDED_WORDS)
_SUBJECTS = ("the farmer", "my sister", "a tired doctor", "the old wizard", "our teacher",
             "a small rabbit", "the captain", "every student", "the musician", "her brother")
_VERBS = ("painted", "carried", "found", "watched", "remembered", "opened", "built", "followed",
          "visited", "described")
_OBJECTS = ("a golden basket", "the wooden bridge", "seven yellow candles", "the quiet village",
            "an empty bottle", "the hidden garden", "a strange letter", "the purple mountain",
            "twelve silver coins", "the broken violin")
_PLACES = ("near the river", "after dinner", "in the morning", "before winter", "at the station",
           "under the bridge", "during the storm", "beside the market")
_CONSONANTS = "bdfghjklmnprstvz"
_VOWELS = "aeiou"


def available() -> bool:
  """Whether espeak-ng is on the PATH."""
  return shutil.which(EXECUTABLE) is not None


def _pseudo_word(rng: np.random.Generator) -> str:
  while True:
    word = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
                   for _ in range(int(rng.integers(1, 4))))
    if word not in EXCLUDED_WORDS:
      return word


def random_text(rng: np.random.Generator, language: str) -> str:
  """A random utterance: words, digits, a sentence (English voices) or made-up words."""
  kind = rng.choice(["words", "digits", "sentence"])
  if kind == "digits":
    return " ".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 9))))
  if not language.startswith("en"):
    return " ".join(_pseudo_word(rng) for _ in range(int(rng.integers(2, 8))))
  if kind == "words":
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 8))))
  parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
  if rng.random() < 0.5:
    parts.append(rng.choice(_PLACES))
  return " ".join(parts)


def random_utterance(rng: np.random.Generator) -> dict:
  """espeak-ng arguments of one random utterance: text, voice, rate (words/min), pitch (0-99)."""
  language = str(rng.choice(LANGUAGES))
  return {"text": random_text(rng, language),
          "voice": f"{language}+{rng.choice(VARIANTS)}",
          "rate": int(rng.integers(100, 260)),
          "pitch": int(rng.integers(10, 95))}


def synthesize(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
  """espeak-ng's rendering of `text`, as a float32 waveform at 16 kHz."""
  out = subprocess.run([EXECUTABLE, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout",
                        text], check=True, capture_output=True).stdout
  waveform, rate_hz = sf.read(io.BytesIO(out), dtype="float32")
  if waveform.ndim > 1:
    waveform = waveform.mean(axis=1)
  g = np.gcd(rate_hz, SAMPLE_RATE)
  return signal.resample_poly(waveform, SAMPLE_RATE // g, rate_hz // g).astype(np.float32)
