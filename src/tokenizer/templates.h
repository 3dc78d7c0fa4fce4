// Prompt templates as plain functions: DeepSeek-V2 and V3 chat formats, the ESFT training
// format (esft.md §4) with its loss mask, and Coder-V2 fill-in-the-middle (PSM order).
#pragma once

#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace moekit {

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant"
  std::string content;
};

// DeepSeek-V3 chat: bos, the system prompts (joined by a blank line), then
// "<｜User｜>" + user and "<｜Assistant｜>" + assistant + eos; with add_generation_prompt a final
// "<｜Assistant｜>".
std::string chat_v3(const std::vector<ChatMessage>& messages, bool add_generation_prompt);
// DeepSeek-V2 chat: bos, then "{system}\n\n", "User: {user}\n\n", "Assistant: {assistant}" + eos;
// with add_generation_prompt a final "Assistant:".
std::string chat_v2(const std::vector<ChatMessage>& messages, bool add_generation_prompt);

// ESFT's training sample: bos + "User: {user}\n\nAssistant:" is the prompt (no loss), then
// " {assistant}" + eos is the response (loss). labels[i] is the id to predict at position i
// (-100 where no loss), i.e. already shifted: labels[i] = ids[i+1] inside the response.
struct EsftSample {
  std::vector<int32_t> ids;
  std::vector<int32_t> labels;
};
EsftSample esft_sample(const Tokenizer& tok, const std::string& user, const std::string& assistant);
std::string esft_prompt(const std::string& user);

// Coder-V2 fill-in-the-middle, prefix-suffix-middle order:
// "<｜fim▁begin｜>" + prefix + "<｜fim▁hole｜>" + suffix + "<｜fim▁end｜>" + middle.
std::string fim_psm(const std::string& prefix, const std::string& suffix,
                    const std::string& middle);

}  // namespace moekit
