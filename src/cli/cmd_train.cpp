// `moekit train`: pretraining with Loss-Free Balancing (or the aux-loss / no-balance baselines).
#include <fmt/format.h>

#include <cmath>
#include <memory>

#include "cli/commands.h"
#include "train/trainer.h"

namespace moekit::cli {

void add_train_commands(CLI::App& app) {
  struct Args {
    TrainOptions opt;
    std::string config, data, tokenizer, out, balance = "lfb";
    DeviceArgs device;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("train", "Pretrain a DeepSeekMoE model from a config");
  cmd->add_option("--config", a->config, "model config.json")->required();
  cmd->add_option("--data", a->data, "data directory with train.jsonl and val.jsonl")->required();
  cmd->add_option("--out", a->out, "run directory (metrics, checkpoints, final/)")->required();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json (default DATA/tokenizer.json)");
  cmd->add_option("--steps", a->opt.steps, "optimizer steps")->capture_default_str();
  cmd->add_option("--seed", a->opt.seed, "seed for init and data order")->capture_default_str();
  cmd->add_option("--balance", a->balance, "lfb | aux | none")->capture_default_str();
  cmd->add_option("--lfb-rate", a->opt.lfb_rate, "Loss-Free Balancing bias update rate u")
      ->capture_default_str();
  cmd->add_option("--aux-alpha", a->opt.aux_alpha, "aux-loss coefficient (--balance aux)")
      ->capture_default_str();
  cmd->add_option("--batch", a->opt.batch, "sequences per micro-batch")->capture_default_str();
  cmd->add_option("--seq", a->opt.seq, "sequence length")->capture_default_str();
  cmd->add_option("--accumulation", a->opt.accumulation, "micro-batches per step")
      ->capture_default_str();
  cmd->add_option("--lr", a->opt.lr, "peak learning rate")->capture_default_str();
  cmd->add_option("--warmup", a->opt.warmup, "warmup steps")->capture_default_str();
  cmd->add_option("--schedule", a->opt.schedule, "multistep | cosine | constant")
      ->capture_default_str();
  cmd->add_option("--weight-decay", a->opt.weight_decay)->capture_default_str();
  cmd->add_option("--grad-clip", a->opt.grad_clip, "max global gradient norm")
      ->capture_default_str();
  cmd->add_option("--log-every", a->opt.log_every)->capture_default_str();
  cmd->add_option("--eval-every", a->opt.eval_every)->capture_default_str();
  cmd->add_option("--eval-batches", a->opt.eval_batches)->capture_default_str();
  cmd->add_option("--save-every", a->opt.save_every)->capture_default_str();
  cmd->add_option("--keep", a->opt.keep_checkpoints, "checkpoints kept")->capture_default_str();
  cmd->add_flag("--resume", a->opt.resume, "continue from the run's last checkpoint");
  add_device_options(cmd, a->device);
  cmd->add_flag("--checkpoint-activations", a->opt.activation_checkpointing,
                "keep only each layer's input and recompute the layer in backward (less memory, "
                "one more forward)");
  cmd->add_flag("--recompute-experts", a->opt.recompute_experts,
                "recompute the MoE experts' gate and up projections in backward instead of keeping "
                "them (less memory, two more grouped GEMMs per MoE layer)");
  cmd->callback([a] {
    a->opt.config_file = a->config;
    a->opt.data_dir = a->data;
    a->opt.tokenizer = a->tokenizer;
    a->opt.out = a->out;
    a->opt.balance = parse_balance(a->balance);
    a->opt.device = parse_device(a->device);
    TrainResult r = train(a->opt);
    fmt::print(
        "final: loss {:.4f}, val_loss {:.4f} (ppl {:.2f}), val MaxVio global {:.3f}, "
        "batch {:.3f}, {:.0f} tokens/s -> {}\n",
        r.final_loss, r.val_loss, std::exp(r.val_loss), r.val_maxvio_global, r.val_maxvio_batch,
        r.tokens_per_s, r.final_dir.string());
  });
}

}  // namespace moekit::cli
