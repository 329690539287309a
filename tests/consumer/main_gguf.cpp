// lora::gguf: a matrix written as a GGUF tensor reads back unchanged.
#include <lora/gguf.hpp>

#include <iostream>

int main() {
  const Eigen::MatrixXf W = Eigen::MatrixXf::Random(4, 6);
  lora::io::GgufWriter w;
  w.set_value("general.architecture", std::string("llama"));
  w.add_matrix("blk.0.attn_q.weight", W, lora::io::GgmlType::F32);
  const lora::io::GgufFile f = lora::io::GgufFile::parse(w.serialize());
  const bool ok = f.matrix<float>("blk.0.attn_q.weight") == W &&
                  f.get<std::string>("general.architecture") == "llama";
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok ? 0 : 1;
}
