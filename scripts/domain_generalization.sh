#!/usr/bin/env bash
# Domain generalisation (CoOp's Table): learn the prompt on ImageNet, evaluate it on ImageNetV2,
# ImageNet-Sketch, ImageNet-A and ImageNet-R (A and R: their 200-class subsets, classifier built from the
# learned context with those class names).
#
# Usage: bash scripts/domain_generalization.sh --data-root DATA [options]
#
# The same as scripts/cross_dataset.sh --source imagenet --targets imagenetv2,imagenet_sketch,imagenet_a,imagenet_r
# and takes the same options (--shots 16, --seeds 1,2,3, --model, --pretrained, --jobs, --epochs, variant
# flags, --skip-missing, ...; --targets/--source override the defaults). Missing datasets stop the script
# with a message naming each one and where it is expected, before anything is encoded or trained.
set -euo pipefail
for arg in "$@"; do
  if [[ $arg == -h || $arg == --help ]]; then
    sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
    exit 0
  fi
done
exec bash "$(dirname "$0")/cross_dataset.sh" --source imagenet \
  --targets imagenetv2,imagenet_sketch,imagenet_a,imagenet_r "$@"
