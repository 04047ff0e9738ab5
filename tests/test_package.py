"""The package's top level: the ops and the table with torch alone, the TorchRec names on first use."""
import subprocess
import sys
import textwrap


def test_import_needs_torch_alone_and_torchrec_names_resolve():
    code = textwrap.dedent("""
        import sys
        import torchrec_tt
        assert "torchrec" not in sys.modules, "import torchrec_tt imported torchrec"
        assert "TTEmbeddingBagCollection" in dir(torchrec_tt)
        from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig, get_sharders_and_planner, shard_model
        import torchrec_tt.config, torchrec_tt.distributed
        from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection as C
        assert TTEmbeddingBagConfig is torchrec_tt.config.TTEmbeddingBagConfig and TTEmbeddingBagCollection is C
        assert get_sharders_and_planner is torchrec_tt.distributed.get_sharders_and_planner
        assert shard_model is torchrec_tt.distributed.shard_model
        try:
            torchrec_tt.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
