"""fedgen: FedGen-Edge (frozen backbone + federated LoRA adapters) in JAX."""
