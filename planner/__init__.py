"""TT-aware planning for TorchRec's sharding planner (installed as ``torchrec_tt.planner``)."""
