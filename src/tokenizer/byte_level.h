// The byte-level alphabet of GPT-2-style BPE: every byte is shown as one printable Unicode
// character (printable ASCII and Latin-1 stand for themselves, the rest move to U+0100 and up),
// so that tokens in tokenizer.json are readable strings. moekit works on raw bytes internally and
// uses this map only at the file boundary.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moekit {

// Code point that stands for byte b.
uint32_t byte_to_codepoint(uint8_t b);
// The byte a code point stands for, if any.
std::optional<uint8_t> codepoint_to_byte(uint32_t cp);

// Raw bytes -> byte-level string (UTF-8 of the mapped code points).
std::string bytes_to_byte_level(std::string_view bytes);
// Byte-level string -> raw bytes; nullopt when a character is not in the alphabet.
std::optional<std::string> byte_level_to_bytes(std::string_view s);

// UTF-8 helpers shared by the tokenizer files.
void append_utf8(std::string& out, uint32_t cp);
// Length of the valid UTF-8 sequence at s[i] (0 if invalid there).
size_t utf8_valid_len(std::string_view s, size_t i);

}  // namespace moekit
