// Template strings.
#include "tokenizer/templates.h"

#include "core/error.h"

namespace moekit {

namespace {
const char* kBos = "<｜begin▁of▁sentence｜>";
const char* kEos = "<｜end▁of▁sentence｜>";

void check_role(const ChatMessage& m) {
  if (m.role != "system" && m.role != "user" && m.role != "assistant")
    fail("chat template: unknown role \"{}\" (system, user or assistant)", m.role);
}
}  // namespace

std::string chat_v3(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string system, body;
  for (const auto& m : messages) {
    check_role(m);
    if (m.role == "system") system += (system.empty() ? "" : "\n\n") + m.content;
    if (m.role == "user") body += "<｜User｜>" + m.content;
    if (m.role == "assistant") body += "<｜Assistant｜>" + m.content + kEos;
  }
  return kBos + system + body + (add_generation_prompt ? "<｜Assistant｜>" : "");
}

std::string chat_v2(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out = kBos;
  for (const auto& m : messages) {
    check_role(m);
    if (m.role == "system") out += m.content + "\n\n";
    if (m.role == "user") out += "User: " + m.content + "\n\n";
    if (m.role == "assistant") out += "Assistant: " + m.content + kEos;
  }
  return add_generation_prompt ? out + "Assistant:" : out;
}

std::string esft_prompt(const std::string& user) {
  return "User: " + user + "\n\nAssistant:";
}

EsftSample esft_sample(const Tokenizer& tok, const std::string& user,
                       const std::string& assistant) {
  if (tok.bos_id() < 0 || tok.eos_id() < 0)
    fail("ESFT format needs bos and eos tokens in the tokenizer");
  EsftSample s;
  s.ids = tok.encode(esft_prompt(user), true);
  const size_t prompt_len = s.ids.size();
  auto resp = tok.encode(" " + assistant, false);
  s.ids.insert(s.ids.end(), resp.begin(), resp.end());
  s.ids.push_back(tok.eos_id());
  s.labels.assign(s.ids.size(), -100);
  for (size_t i = prompt_len - 1; i + 1 < s.ids.size(); ++i) s.labels[i] = s.ids[i + 1];
  return s;
}

std::string fim_psm(const std::string& prefix, const std::string& suffix,
                    const std::string& middle) {
  return "<｜fim▁begin｜>" + prefix + "<｜fim▁hole｜>" + suffix + "<｜fim▁end｜>" + middle;
}

}  // namespace moekit
