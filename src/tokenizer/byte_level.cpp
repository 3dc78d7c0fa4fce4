// Byte-level alphabet and UTF-8 helpers.
#include "tokenizer/byte_level.h"

namespace moekit {

namespace {
bool printable(uint8_t b) {
  return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
}

struct Tables {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 512> from_cp{};  // code points < 512 only
  Tables() {
    from_cp.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      uint32_t cp = printable(uint8_t(b)) ? uint32_t(b) : next++;
      to_cp[size_t(b)] = cp;
      from_cp[cp] = int16_t(b);
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

// Decodes one code point at s[i] (assumed valid); advances i.
uint32_t next_cp(std::string_view s, size_t& i) {
  auto c = uint8_t(s[i]);
  size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1Fu) : n == 3 ? (c & 0x0Fu) : (c & 0x07u);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3Fu);
  i += n;
  return cp;
}
}  // namespace

uint32_t byte_to_codepoint(uint8_t b) {
  return tables().to_cp[b];
}

std::optional<uint8_t> codepoint_to_byte(uint32_t cp) {
  if (cp >= 512 || tables().from_cp[cp] < 0) return std::nullopt;
  return uint8_t(tables().from_cp[cp]);
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

size_t utf8_valid_len(std::string_view s, size_t i) {
  auto c = uint8_t(s[i]);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t min;
  if (c >= 0xC2 && c <= 0xDF)
    n = 2, min = 0x80;
  else if (c >= 0xE0 && c <= 0xEF)
    n = 3, min = 0x800;
  else if (c >= 0xF0 && c <= 0xF4)
    n = 4, min = 0x10000;
  else
    return 0;
  if (i + n > s.size()) return 0;
  uint32_t cp = c & (n == 2 ? 0x1Fu : n == 3 ? 0x0Fu : 0x07u);
  for (size_t k = 1; k < n; ++k) {
    auto d = uint8_t(s[i + k]);
    if ((d & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (d & 0x3Fu);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

std::string bytes_to_byte_level(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) append_utf8(out, byte_to_codepoint(uint8_t(c)));
  return out;
}

std::optional<std::string> byte_level_to_bytes(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    if (utf8_valid_len(s, i) == 0) return std::nullopt;
    auto b = codepoint_to_byte(next_cp(s, i));
    if (!b) return std::nullopt;
    out += char(*b);
  }
  return out;
}

}  // namespace moekit
