"""What the run readout carries on held-out sites: the ceiling of what the LLM can read from it.

    python benchmarks/readout_heldout.py CORPUS.jsonl SERIES_DIR TOKENIZER_DIR [--heldout-sites A,B,C] [--ablation]

Fits the readout (model/readout.py) on the training sites exactly as ``fmrilm pretrain`` does,
then scores the held-out sites: AUROC of the diagnosis and sex scores, and for each task of the
default task list the balanced accuracy of a one-feature logistic regression from the task's
readout score (fitted on the training runs' cross-fitted scores: the mapping the LLM has to learn)
to its answer, beside logistic regression on FC fitted on the same training runs (the gates'
baseline). Prints one JSON object. ``--ablation`` fits four readouts instead (with and without the
last signal statistic, the regions' modularity shares; with and without the per-score choice
between every feature and the signal statistics alone) and prints their held-out figures as a
table, the readout of the installed code in the last column.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(corpus: str, series: str, tokenizer_dir: str, heldout: list[str] | None = None,
         drop_stats: int = 0, select_features: bool = True, data=None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from bids_fmrilm.model.config import get_config
    from bids_fmrilm.model.tasks import default_tasks
    from bids_fmrilm.tokenizer import Tokenizer
    from bids_fmrilm.training.evaluate_lm import fc_logistic
    from bids_fmrilm.training.lm import prepare_data, run_readouts, split_sites

    t0 = time.time()
    tok = Tokenizer.load(tokenizer_dir)
    data = prepare_data(corpus, series, tok, log=lambda m: None) if data is None else data
    held = heldout or tok.meta["training"]["heldout_sites"]
    train, test = split_sites(data, held)
    cfg = get_config("cpu")
    tasks = default_tasks(cfg.descriptor_questions)
    F = data.run_vec[0].shape[1]
    readout, vals = run_readouts(data, train, tasks, cfg, log=lambda m: None, n_features=F - drop_stats,
                                 select_features=select_features)
    col = {n: j for j, n in enumerate(readout.names)}
    out: dict = {"tokenizer": tokenizer_dir, "heldout_sites": held, "n_test": int(len(test)),
                 "readout_values": readout.dim, "tasks": {}}
    for task in tasks:
        where, _, key = task.source.partition(":")
        name = f"z:{key}" if where == "descriptor" else next((n for n in readout.names if n.startswith(task.name + ":")), None)
        if name not in col:
            continue
        ytr = [task.answer_for(data.phenotype[i], data.z[i]) for i in train]
        yte = [task.answer_for(data.phenotype[i], data.z[i]) for i in test]
        ktr = np.array([a is not None for a in ytr])
        kte = np.array([a is not None for a in yte])
        ai = {a: k for k, a in enumerate(task.answers)}
        a_tr = np.array([ai[a] for a in np.array(ytr, dtype=object)[ktr]])
        a_te = np.array([ai[a] for a in np.array(yte, dtype=object)[kte]])
        x_tr, x_te = vals[train[ktr], col[name]][:, None], vals[test[kte], col[name]][:, None]
        clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit(x_tr, a_tr)
        res = {"score": name, "readout_bacc": round(float(balanced_accuracy_score(a_te, clf.predict(x_te))), 3)}
        fp = fc_logistic(data.fc[train[ktr]], a_tr, data.fc[test[kte]])
        res["fc_logistic_bacc"] = round(float(balanced_accuracy_score(a_te, fp.argmax(1))), 3)
        if len(task.answers) == 2 and len(np.unique(a_te)) == 2:
            s = x_te[:, 0] * (1 if clf.coef_[0, 0] >= 0 else -1)
            res["readout_auroc"] = round(float(roc_auc_score(a_te, s)), 3)
            res["fc_logistic_auroc"] = round(float(roc_auc_score(a_te, fp[:, 1])), 3)
        out["tasks"][task.name] = res
    out["crossfit"] = readout.info.get("crossfit")
    out["seconds"] = round(time.time() - t0, 1)
    return out


def ablation(corpus: str, series: str, tokenizer_dir: str, heldout: list[str] | None = None) -> str:
    """Markdown table of the held-out figures of four readouts (see the module docstring)."""
    from bids_fmrilm.tokenizer import Tokenizer
    from bids_fmrilm.training.lm import prepare_data

    data = prepare_data(corpus, series, Tokenizer.load(tokenizer_dir), log=lambda m: None)
    variants = {"no modularity share, every feature": (1, False), "no modularity share, feature choice": (1, True),
                "modularity share, every feature": (0, False), "modularity share, feature choice": (0, True)}
    res = {v: main(corpus, series, tokenizer_dir, heldout, d, s, data=data) for v, (d, s) in variants.items()}
    first = next(iter(res.values()))
    lines = ["| task (held-out " + ", ".join(first["heldout_sites"]) + f", {first['n_test']} runs) | "
             + " | ".join(variants) + " | FC logistic |", "|---" * (len(variants) + 2) + "|"]
    for task, r in first["tasks"].items():
        metric = "readout_auroc" if "readout_auroc" in r else "readout_bacc"
        lines.append(f"| {task} ({'AUROC' if metric == 'readout_auroc' else 'balanced accuracy'}) | "
                     + " | ".join(f"{res[v]['tasks'][task][metric]:.3f}" for v in variants)
                     + f" | {r[metric.replace('readout', 'fc_logistic')]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    held = None
    if "--heldout-sites" in args:
        i = args.index("--heldout-sites")
        held = args[i + 1].split(",")
        args = args[:i] + args[i + 2:]
    table = "--ablation" in args
    args = [a for a in args if a != "--ablation"]
    if len(args) != 3:
        sys.exit(__doc__)
    print(ablation(*args, heldout=held) if table else json.dumps(main(*args, heldout=held), indent=1))
