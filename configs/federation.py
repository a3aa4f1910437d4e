"""The federation section every task config shares (config field ``fed``).

One place for the fields of the engine (fedgen.fl.engine, fedgen.algorithms), its faults, server
reduction, LoRA aggregation and privacy, so every task offers the same switches with the same
defaults; a task config passes what differs (rounds, local steps, client learning rate).
"""
import ml_collections


def fed(rounds: int, max_steps_per_epoch: int, client_lr: float) -> dict:
    """The ``fed`` section: FedGen-Edge, 100 clients, 10 per round, no faults, plain FedAvg."""
    return dict(
        algorithm='fedgen_edge',
        num_clients=100,
        clients_per_round=10,
        rounds=rounds,
        local_epochs=1,
        batch_size=16,
        max_steps_per_epoch=max_steps_per_epoch,
        client_opt='adam',
        client_lr=client_lr,
        server_opt='sgd',
        server_lr=1.0,
        # FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021): momentum, second moment, tau.
        server_b1=0.9,
        server_b2=0.99,
        server_tau=1e-3,
        client_chunk=5,
        client_mem_budget_mb=0.0,
        num_devices=0,
        prox_mu=0.0,
        prox_target='lora',
        ditto_lambda=0.0,
        # Server EMA of the global adapter (fedgen.fl.algorithm.with_ema); 0 = off.
        ema_decay=0.0,
        # Log client_drift (spread of the updates around the mean; the local-epochs ablation).
        log_client_drift=False,
        # Faults (fedgen.fl.fates, fedgen.fl.attacks): rates in [0, 1); none by default.
        dropout_rate=0.0,
        straggler_rate=0.0,
        straggler_min_frac=1.0,
        over_select=0.0,
        attack=dict(kind='none', fraction=0.0, scale=1.0, noise_norm=1.0),
        # Server reduction (fedgen.aggregators.robust): mean (weighted by n_k) or a robust one.
        aggregator='mean',
        robust=dict(beta=0.1, bound=0.0, f=1, m=0, iters=4, nu=1e-6),
        # LoRA aggregation (fedgen.aggregators.lora_math); residual_rank: None = dense residual.
        lora_aggregation='avg_ab',
        residual_rank=ml_collections.config_dict.placeholder(int),
        # User-level DP-FedAvg (fedgen.privacy): clip_norm 0 = off; delta 0 = N^-1.1;
        # target_epsilon > 0 calibrates the noise multiplier for fed.rounds.
        dp=dict(
            clip_norm=0.0,
            noise_multiplier=0.0,
            target_epsilon=0.0,
            delta=0.0,
            accountant='rdp',
            sampling='fixed',
            adaptive=False,
            target_quantile=0.5,
            clip_lr=0.2,
            count_stddev=-1.0,
            # Also log statistics of raw client updates (outside epsilon; said at start).
            log_diagnostics=False),
        # Simulated secure aggregation (needs fed.dp.clip_norm > 0); scale 0 = largest safe;
        # simulate_masks: draw and cancel the pairwise masks (else the exact modular sum).
        secagg=dict(enabled=False, bits=32, scale=0.0, simulate_masks=False))
