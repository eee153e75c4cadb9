"""Copy a trained predictor into the package (float16 head), as the default model's.

    python scripts/ship_predictor.py PREDICTOR_DIR MODEL_DIR smollm2-135m --note "how it was trained"

`--selector predictor` then finds it for any conversion of that model
(`ifp_mlx.predictor.shipped_predictor` matches the target fingerprint).
"""

# isort: off
import ifp_mlx  # noqa: F401  (first: it preloads OpenBLAS before mlx.core)
import mlx.core as mx

# isort: on
import argparse
import shutil
from pathlib import Path

from ifp_mlx.files import atomic_folder
from ifp_mlx.model.load import load
from ifp_mlx.model.predictor_head import SHIPPED_FOLDER, write_predictor_files
from ifp_mlx.select.predictor import load_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictor", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("name")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    loaded = load(args.model, dense=False)
    predictor, config = load_predictor(args.predictor, loaded)
    if not predictor.backbone.shared:
        raise SystemExit("only shared:N predictors ship in the package (no backbone weights)")
    out = Path(ifp_mlx.__file__).parent / SHIPPED_FOLDER / args.name
    extra = {"training": args.note}
    with atomic_folder(out, force=True) as tmp:
        if "adapter" in config:  # LoRA weights trained with it: they ship beside the head, float32 (small)
            shutil.copy2(args.predictor / config["adapter"]["file"], tmp / config["adapter"]["file"])
            extra["adapter"] = config["adapter"]
        write_predictor_files(tmp, predictor, loaded.config, config["keep"], config["backbone"], dtype=mx.float16, **extra)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
