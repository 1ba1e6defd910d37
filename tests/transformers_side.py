"""Run as a script, in a fresh process where fillmask cannot be imported: load each exported
folder with transformers' Auto classes and write their outputs, for the registry export test.

    python transformers_side.py JOBS.pt OUT.pt

JOBS.pt holds ``{"cases": [{"folder", "auto", "input_ids", "attention_mask"}], "pipeline":
[{"folder", "text", "top_k"}]}``; OUT.pt gets each case's logits (or hidden states) and each
pipeline's predicted token ids, plus what the tokenizers report.
"""

from __future__ import annotations

import importlib.abc
import sys


class NoFillmask(importlib.abc.MetaPathFinder):
    """Refuse to import fillmask or its plugins: exported folders must not need them."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102
        if name.split(".")[0] in ("fillmask", "fillmask_deberta", "fillmask_modernbert"):
            raise ImportError(f"{name} is blocked: the exported folder imported fillmask")
        return None


sys.meta_path.insert(0, NoFillmask())

import torch  # noqa: E402
import transformers  # noqa: E402


def run_case(case: dict) -> torch.Tensor:
    auto = getattr(transformers, case["auto"])
    model = auto.from_pretrained(case["folder"], trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(input_ids=case["input_ids"], attention_mask=case["attention_mask"])
    if case["auto"] == "AutoModel":
        value = out.last_hidden_state
    elif case["auto"] == "AutoModelForQuestionAnswering":
        value = torch.stack([out.start_logits, out.end_logits], dim=-1)  # (B, T, 2)
    else:
        value = out.logits
    return value, type(model).__name__


def run_pipeline(job: dict) -> dict:
    fill = transformers.pipeline("fill-mask", model=job["folder"], trust_remote_code=True,
                                 top_k=job["top_k"])
    predictions = fill(job["text"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["folder"])
    long = tokenizer(job["text"] * 200, truncation=True)["input_ids"]
    padded = tokenizer([job["text"], "a"], padding=True)
    return {"ids": [p["token"] for p in predictions], "mask": tokenizer.mask_token,
            "pad": tokenizer.pad_token, "cls": tokenizer.cls_token, "sep": tokenizer.sep_token,
            "padding_side": tokenizer.padding_side, "truncated_length": len(long),
            "model_max_length": tokenizer.model_max_length,
            "inputs": sorted(padded.keys()), "second_row": padded["input_ids"][1]}


def main(jobs_file: str, out_file: str) -> None:
    jobs = torch.load(jobs_file, weights_only=False)
    outputs, classes = [], []
    for case in jobs["cases"]:
        value, name = run_case(case)
        outputs.append(value)
        classes.append(name)
    pipelines = [run_pipeline(job) for job in jobs["pipeline"]]
    torch.save({"outputs": outputs, "classes": classes, "pipeline": pipelines}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:3])
