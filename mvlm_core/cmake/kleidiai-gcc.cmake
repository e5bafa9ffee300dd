# Included by CMake at the end of KleidiAI's project() (CMAKE_PROJECT_KleidiAI_INCLUDE, set by mvlm for the
# +kleidiai CPU variants): GCC before 13 stops with an internal compiler error (vect_transform_reduction, seen with
# Debian 12's aarch64-linux-gnu-gcc 12.2 on kai_lhs_quant_pack_qai8dxp_bf16_neon.c) when it auto-vectorizes KleidiAI's
# C packing routines. KleidiAI's kernels are hand-written intrinsics and assembly, so its C files are compiled without
# the auto-vectorizer there; ggml and llama.cpp keep their flags (this applies to KleidiAI's directory only).
if(CMAKE_C_COMPILER_ID STREQUAL "GNU" AND CMAKE_C_COMPILER_VERSION VERSION_LESS 13)
    add_compile_options($<$<COMPILE_LANGUAGE:C>:-fno-tree-vectorize>)
endif()
