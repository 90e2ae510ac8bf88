"""Train the Fashion-MNIST classifier behind `ditkit eval`'s accuracy metric and write it to
ditkit/assets/fmnist_classifier.safetensors (about 5 minutes on 2 CPU cores).

    python scripts/train_fmnist_classifier.py [--epochs 5] [--seed 0] [--out PATH]
"""

import argparse

from ditkit.evaluate import CLASSIFIER_PATH, train_classifier

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(CLASSIFIER_PATH))
    args = parser.parse_args()
    accuracy = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(f"test accuracy {accuracy:.4f}; wrote {args.out}")
