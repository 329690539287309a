// lora::mpi: data-parallel gradient averaging (run on one rank: the average is the gradient).
#include <lora/core.hpp>
#include <lora/mpi.hpp>

#include <iostream>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  bool ok = false;
  {
    lora::LoRAConfig cfg;
    cfg.rank = 2;
    lora::LoRALinear<float> layer(Eigen::MatrixXf::Random(6, 5), cfg);
    lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, lora::adapter_parameters(layer));
    ok = dp.size() >= 1 && dp.parameter_count() == 2 * (6 + 5);
    dp.average_gradients();
  }
  MPI_Finalize();
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok ? 0 : 1;
}
