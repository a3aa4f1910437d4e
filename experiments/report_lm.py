"""The language-model parts of REPORT.md: a study's model and scale line, its Fig. 3 tables (the
per-round protocol's finals, the whole-split scores, full FedAvg's learning-rate grid) and the
second study's section. Numbers come from experiments/measures.py's ``study``."""
import numpy as np

from experiments.claims import claim_lower, claim_personal

SOURCES = {'smollm2-135m': 'SmolLM2-135M (frozen; the Q4_1 GGUF, dequantized)'}


def fmt(v) -> str:
    return 'n/a' if v is None or (isinstance(v, float) and not np.isfinite(v)) else f'{v:.4g}'


def ms(s: dict) -> str:
    """'mean ± std' over seeds; one seed has no spread: 'x (n = 1)'; no global model: 'n/a'."""
    if not s.get('global', True):
        return 'n/a'
    if s['mean'] is None:
        return 'failed'
    return f'{fmt(s["mean"])} (n = 1)' if s.get('n',
                                                2) == 1 else f'{fmt(s["mean"])} ± {fmt(s["std"])}'


def _mp(s: dict) -> str:
    """The personal column: mean client-test metric of the personal models."""
    p = s.get('personal')
    if not p:
        return 'not measured'
    return (f'{fmt(p["mean"])} ({p["source"]}; backbone {fmt(p["backbone"])} on the same '
            f'{p["clients"]} clients)')


def model_name(setup: dict) -> str:
    """'SmolLM2-135M (...)' for a loaded backbone; 'GPT, 2 layers x 128, pre-trained 500 steps
    here' for one built from the config's geometry."""
    mdl = setup['model']
    source = mdl.get('source', 'local')
    if source != 'local':
        return SOURCES.get(source, source)
    name = mdl['name'].upper() if mdl['name'] == 'gpt' else mdl['name'].capitalize()
    layers = f'{mdl["n_layer"]} layer' + ('s' if mdl['n_layer'] != 1 else '')
    return f'{name}, {layers} x {mdl["n_embd"]}, pre-trained {setup["pretrain_steps"]} steps here'


def scale_line(s: dict) -> str:
    """The study's population, budget and adapter, from its setup."""
    return (f'{model_name(s)}, configs/{s["config"]}_<method>.py'
            f'{":" + s["arg"] if s["arg"] else ""}: {s["num_clients"]} clients, '
            f'{s["clients_per_round"]} per round, {s["rounds"]} rounds, E={s["local_epochs"]} '
            f'of at most {s["max_steps_per_epoch"]} steps of {s["batch_size"]} windows of '
            f'{s["seq_len"]} tokens; LoRA r={s["lora_rank"]}, alpha={s["lora_alpha"]:g} on '
            f'{", ".join(s["lora_targets"])}.')


def ptb_table(ptb: dict) -> list[str]:
    """One row per method of ``ptb`` ({method: measures.stats-like dict}): the global model's
    final valid PPL under the per-round protocol ('n/a' without a global model, 'x (n = 1)' for
    one run) and the personal models' mean client-test PPL where it was measured."""
    lines = [
        'Global: the global model on the validation split (n/a for FedSA and local-only, which '
        "have no global model). Personal: mean local-test PPL of the clients' personal models.", '',
        '| method | final global valid PPL (mean ± std) | per seed | personal models |',
        '|---|---|---|---|'
    ]
    return lines + [
        f'| {k} | {ms(v)} | {", ".join(fmt(x) for x in v["per_seed"]) or "n/a"} | {_mp(v)} |'
        for k, v in ptb.items()
    ]


def protocol(m: dict) -> str:
    """The per-round evaluation protocol of a study's curve and ``ptb_table``."""
    e = m['eval']
    return (f'Per-round protocol: word-level PPL of {e["words"]} validation words '
            f'({m["setup"]["eval"].get("subset_lines") or "all"} lines), window {e["window"]}, '
            f'stride {e["stride"]} tokens.')


def whole_table(w: dict) -> list[str]:
    """The final models (and the zero-shot backbone) on the whole splits that were scored."""
    p, splits = w['protocol'], w['splits']
    per = lambda v: ', '.join(fmt(x) for x in v['per_seed']) or 'n/a'
    name = {'valid': 'validation', 'test': 'test'}
    words = ' and '.join(f'{p[f"{s}_words"]} {name[s]}' for s in splits)
    lines = [
        f'The final models scored again on the whole splits (experiments.rescore): word-level PPL '
        f'of W = {words} words, window {p["window"]} tokens, stride S = {p["stride"]}.', '',
        '| model | ' + ' | '.join(f'{s} PPL (mean ± std) | per seed' for s in splits) + ' |',
        '|---|' + '---|---|' * len(splits)
    ]
    for k, v in w.items():
        if k in ('backbone', 'protocol', 'splits'):
            continue
        lines.append(f'| {k} | ' + ' | '.join(f'{ms(v[s])} | {per(v[s])}' for s in splits) + ' |')
    b = w['backbone']
    lines.append('| frozen backbone (zero-shot) | ' + ' | '.join(f'{fmt(b[s])} | '
                                                                 for s in splits) + '|')
    return lines


def lr_grid(grid: dict, chosen, method: str, lrs=(), pinned: bool = False) -> str:
    """``method``'s client-lr grid ({lr: seed-0 final valid PPL}) and the lr it chose, or the
    config's lr when there was no grid. ``lrs``: the whole grid; ``pinned``: the scale fixes the
    lr (experiments.lm_study.tuned), and the grid shows what is finished in the workdir."""
    if not grid and not lrs:
        return f"{method}'s client learning rate: {chosen:g} (the config's, not tuned)."
    shown = ', '.join(f'{float(lr):g}: {fmt(v)}'
                      for lr, v in sorted(grid.items(), key=lambda x: float(x[0])))
    ran = sorted(float(lr) for lr in grid)
    missing = [float(lr) for lr in lrs if float(lr) not in ran]
    if pinned and missing:
        return (f"{method}'s client learning rate: {chosen:g}, pinned by the scale from its grid "
                f'{[float(x) for x in lrs]} on seed 0 (lowest final valid PPL; `python -m '
                'experiments.reproduce --tune` runs it). Not run in this workdir: '
                f'{missing}' + (f'; finished: {shown}.' if grid else '.'))
    best = min(grid, key=lambda lr: float('inf') if grid[lr] is None else grid[lr])
    edge = (' The chosen lr is at the edge of the grid, so a better one may lie beyond it.'
            if len(ran) > 1 and float(chosen) in (ran[0], ran[-1]) else '')
    pin = ''
    if pinned:
        pin = (' It is pinned by the scale (the grid runs under `--tune`).'
               if float(best) == float(chosen) else
               f' The scale pins it, but the grid\'s best is {float(best):g}: the pin is '
               'stale.')
    return (f"{method}'s client learning rate, tuned on seed 0 (final valid PPL, per-round "
            f'protocol): {shown}; chosen {chosen:g}.{edge}{pin}')


def seed_cis(pe: dict) -> str:
    """'81.0% [73.0, 88.0]; ...': every seed's share improved and its 95% CI."""
    return '; '.join(f'{100 * a:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]'
                     for a, lo, hi in pe['per_seed'])


def second_study(m2: dict) -> list[str]:
    """The second study's section: its scale, Fig. 3 table, claim 2 and claim 4 on both splits."""
    p = m2['ptb']
    verdict, why = claim_lower(p['fedgen_edge']['per_seed'], p['fedavg_full']['per_seed'],
                               'valid PPL')
    lines = [
        '', f'### Second study: {model_name(m2["setup"])}', '',
        scale_line(m2['setup']), '',
        protocol(m2), ''
    ]
    lines += ptb_table(p)
    lines += [
        '', f'Backbone (no federated training): {fmt(m2["ptb_backbone"])}. Claim 2 here: '
        f'**{verdict}** ({why}).', '',
        f'Claim 4 here, document split (share of clients that improve, 95% CI, per seed): '
        f'{seed_cis(m2["personal"])}: **{claim_personal(m2["personal"]["per_seed"])[0]}**.'
    ]
    if 'personal_window' in m2:
        w = m2['personal_window']
        lines[-1] += (f' Window split: {seed_cis(w)}: **{claim_personal(w["per_seed"])[0]}** (test '
                      'windows between training windows of the same passages).')
    return lines
