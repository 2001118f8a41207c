"""How much of a label the fMRI-LM's run embedding keeps, on participants no checkpoint trained on.

    python benchmarks/embedding_probe.py PARTICIPANT_OUT PARTICIPANTS_TSV CHECKPOINT [CHECKPOINT ...]
        [--labels diagnosis,sex] [--group site] [--only LABELS_FILE] [--n-boot 2000] [--layers]

For each checkpoint: the run embedding the participant level writes (mean final hidden state over
the fMRI positions) and the LLM's input at those positions (layer 0, averaged) of every run in
PARTICIPANT_OUT (its token files must come from the checkpoints' tokenizer), the final hidden
state at the prompt's last token (``prompt_last``, after ``</fmri>``) and, for a checkpoint with one
position per region (``slot_pooling="region"``), each region's LLM input and final hidden state
averaged over the run's patches and concatenated region by region (``region_input``,
``region_embedding``), probed with the group
level's pipeline (standardise, PCA, logistic regression with inner CV) across folds grouped by
``--group`` (one fold per group value up to 5), AUROC within each test fold, with a bootstrap
interval. FC logistic regression on the same folds is the baseline. With several checkpoints the
first is the reference: the paired difference of each other checkpoint's embedding probe
(participants resampled within fold) is printed beside it. ``--only`` keeps the participant labels
listed in a file (one per line, without ``sub-``), e.g. held-out sites. ``--layers`` adds the
probe of the span mean after every decoder layer (where the LLM loses or gains the signal) and,
for a checkpoint with a run readout, of the hidden state at the readout's position, and
every checkpoint reports how large its fMRI input positions are against the LLM's word embeddings
(``fmri_to_word_norm``; the LLM was pretrained on inputs of ratio about 1). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def _features(checkpoint, output_dir, pids, layers: bool = False, lora_off: bool = False) -> tuple[list[str], dict]:
    """Hidden-state features of every participant's first run (see the module docstring); also the
    run's encoder representation (``encoder``: regions x features, the weighted mean over windows
    that information gate 1 probes) when the run has one. ``lora_off`` switches the checkpoint's
    LoRA and readout adapter off (the base LLM reading the same projector output)."""
    from contextlib import nullcontext

    import torch

    from bids_fmrilm.levels.fewshot import read_token_runs
    from bids_fmrilm.model.api import FMRILMModel
    from bids_fmrilm.model.inference import describe_segments

    meta = json.loads((checkpoint / "fmrilm.json").read_text())
    runs = read_token_runs(output_dir, pids, checkpoint, meta)
    keep = [p for p in pids if p in runs]
    model = FMRILMModel.load(checkpoint, verify=False)
    fm = model.fm.eval()
    backbone, _ = fm._backbone()
    emb, l0, by_layer, at_readout, norms, last, regions, enc = [], [], [], [], [], [], [], []
    word = float(fm.llm.get_input_embeddings().weight.detach().float().norm(dim=1).mean())
    with torch.no_grad(), (fm.llm.disable_adapter() if lora_off else nullcontext()):
        for p in keep:
            run = runs[p][0]
            blk = model.block(run)
            if run.feats is not None and run.run_vec is not None:  # run_vec's leading columns: the weighted mean
                enc.append(np.asarray(run.run_vec[:, :run.feats.shape[-1]], dtype=np.float32))
            built = fm.build([describe_segments(0)], [blk])
            mask, pos = fm.attention(built)
            with nullcontext() if lora_off else fm.conditioned(built):
                o = backbone(inputs_embeds=built["embeds"], attention_mask=mask, position_ids=pos,
                             output_hidden_states=True)
            emb.append(fm.run_embeddings(o.last_hidden_state, built)[0].numpy())
            last.append(o.last_hidden_state[0, -1].float().numpy())  # the prompt's last token, after </fmri>
            l0.append(fm.run_embeddings(o.hidden_states[0], built)[0].numpy())
            b, s, e = built["spans"][0]
            if fm.projector.per_region:  # each region's positions averaged over patches, region by region
                _, _, first, n = built["fmri"][0]
                R = blk.roi.shape[0]
                regions.append([h[b, first:first + n * R].float().reshape(n, R, -1).mean(0).reshape(-1).numpy()
                                for h in (o.hidden_states[0], o.last_hidden_state)])
            norms.append(float(built["embeds"][b, s - 1:e + 1].float().norm(dim=-1).mean()))  # with the markers
            if layers:
                by_layer.append([fm.run_embeddings(h, built)[0].numpy() for h in o.hidden_states[1:-1]])
                if fm.readout is not None:  # the readout's position: just before </fmri>
                    at_readout.append([h[b, e - 1].float().numpy() for h in o.hidden_states[:-1]])
    f = {"embedding": np.stack(emb), "llm_input": np.stack(l0), "prompt_last": np.stack(last), "id": meta.get("id"),
         "fmri_to_word_norm": round(float(np.mean(norms)) / word, 2)}
    if regions:
        f["region_input"], f["region_embedding"] = (np.stack([r[i] for r in regions]) for i in (0, 1))
    if len(enc) == len(keep):
        f["encoder"] = np.stack(enc)  # (runs, R, c)
    if layers:  # hidden_states[1:-1]: after decoder layers 1 .. n-1 (the last is the embedding itself)
        f["layers"] = np.stack(by_layer)  # (runs, layers, H)
        if at_readout:
            f["readout_position"] = np.stack(at_readout)  # (runs, layers from 0 = the LLM's input, H)
    return keep, f


def main(output_dir: str, participants_tsv: str, checkpoints: list[str], labels=("diagnosis", "sex"),
         group: str = "site", only: str | None = None, n_boot: int = 2000, layers: bool = False) -> dict:
    from pathlib import Path

    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from bids_fmrilm.levels.crossval import fc_features, linear_baseline, make_folds, out_of_fold, within_fold_auroc
    from bids_fmrilm.levels.labels import load_labels

    pids = list(pd.read_csv(participants_tsv, sep="\t", dtype=str).participant_id.str.replace("sub-", "", regex=False))
    if only:
        wanted = {ln.strip().replace("sub-", "") for ln in open(only) if ln.strip()}
        pids = [p for p in pids if p in wanted]
    feats = {}
    for ck in map(Path, checkpoints):
        keep, f = _features(ck, Path(output_dir), pids, layers)
        pids = [p for p in pids if p in set(keep)]
        feats[str(ck)] = (keep, f)
    series = {p: sorted(Path(output_dir).glob(f"sub-{p}/**/func/*_timeseries.tsv.gz")) for p in pids}
    fc_all = np.stack([fc_features(series[p]) for p in pids])
    out: dict = {"n_runs": len(pids), "group": group, "checkpoints": {}}
    for label in labels:
        lab = load_labels(Path(participants_tsv), label, "classification", group)
        have = [k for k, p in enumerate(pids) if p in lab.values.index]
        use = [pids[k] for k in have]
        fc = fc_all[have]
        y = lab.values.loc[use].to_numpy()
        classes = lab.classes
        folds = make_folds(lab, use, 5, 0)  # the group level's folds (--cv-group GROUP, seed 0)

        def probe(x, boot=n_boot):
            oof = out_of_fold(lambda yt: linear_baseline("classification", yt, 0), x, y, folds, classes)
            return oof, within_fold_auroc(y, oof, classes, folds, n_boot=boot)

        _, (auc, ci) = probe(fc)
        out.setdefault("fc_logistic", {})[label] = {"auroc_within_fold": round(auc, 3), "ci": np.round(ci, 3).tolist()}
        pos = y == classes[1]
        tests = [t for _, t in folds.splits if 0 < pos[t].sum() < len(t)]
        scores = {}
        for ck, (keep, f) in feats.items():
            rows = [keep.index(p) for p in use]
            res = out["checkpoints"].setdefault(ck, {"id": f["id"], "fmri_to_word_norm": f["fmri_to_word_norm"]})
            for kind in ("embedding", "llm_input", "prompt_last", "region_input", "region_embedding"):
                if kind not in f:
                    continue
                oof, (auc, ci) = probe(f[kind][rows])
                res.setdefault(label, {})[kind] = {"auroc_within_fold": round(auc, 3), "ci": np.round(ci, 3).tolist()}
                if kind == "embedding":
                    scores[ck] = oof[:, 1]
            # per layer: the AUROC alone (no bootstrap interval)
            if "layers" in f:  # the written embedding is the last layer's; these are the ones before it
                res[label]["by_layer"] = {str(li + 1): round(probe(f["layers"][rows, li], 0)[1][0], 3)
                                          for li in range(f["layers"].shape[1])}
            if "readout_position" in f:
                res[label]["readout_position_by_layer"] = {
                    str(li): round(probe(f["readout_position"][rows, li], 0)[1][0], 3)
                    for li in range(f["readout_position"].shape[1])}
        ref = checkpoints[0]
        rng = np.random.default_rng(0)
        idx = [[t[rng.integers(0, len(t), len(t))] for t in tests] for _ in range(n_boot)]

        def mean_auc(s, sample):
            return float(np.mean([roc_auc_score(pos[i], s[i]) for i in sample if 0 < pos[i].sum() < len(i)]))

        for ck in checkpoints[1:]:
            diff = np.array([mean_auc(scores[ck], s) - mean_auc(scores[ref], s) for s in idx])
            out["checkpoints"][ck][label]["embedding"]["minus_first"] = {
                "value": round(mean_auc(scores[ck], tests) - mean_auc(scores[ref], tests), 3),
                "ci": np.round(np.nanpercentile(diff, [2.5, 97.5]), 3).tolist()}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output_dir")
    ap.add_argument("participants_tsv")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--labels", default="diagnosis,sex")
    ap.add_argument("--group", default="site")
    ap.add_argument("--only", default=None)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--layers", action="store_true")
    a = ap.parse_args()
    json.dump(main(a.output_dir, a.participants_tsv, a.checkpoints, a.labels.split(","), a.group, a.only, a.n_boot,
                   a.layers),
              sys.stdout, indent=2)
    print()
