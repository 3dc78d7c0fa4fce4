bash tools/device_run.sh none >/dev/null 2>&1
D=/tmp/deps/usr/lib/x86_64-linux-gnu; export LD_LIBRARY_PATH=$D:$D/openblas-pthread
python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
timeout 120 build/moekit_tests --gtest_filter='CudaBackendTest.ExpertGemm*:CudaBackendTest.GroupedMatmul*:*Index*:*DispatchPlan*' 2>&1 | grep -E "OK|FAILED|rel err|Failure|expected|Which|error" | head -40
for m in own batched; do
MOEKIT_CUDA_EXPERT_GEMM=$m timeout 150 build/bench/moekit_model_bench /tmp/v2-lite-4l.json 4 2048 5 16 cuda esft10 bf16
done
for m in own batched; do
MOEKIT_CUDA_EXPERT_GEMM=$m timeout 150 build/bench/moekit_model_bench configs/deepseek-v2-lite.json 4 2048 3 16 cuda esft10 bf16
done
