# The CPU backend: generic loops + per-ISA micro-kernels. Each ISA file is
# compiled with its own instruction-set flags only; the library picks one at
# run time from the CPU's features (cpu_backend.c), so the binary still runs
# on CPUs without AVX2 or AVX-512.
file(GLOB GQMM_CPU_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/src/cpu/*.c)
list(APPEND GQMM_SOURCES ${GQMM_CPU_SOURCES})
list(APPEND GQMM_DEFINES GQMM_HAVE_CPU)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set_source_files_properties(${CMAKE_SOURCE_DIR}/src/cpu/ukr_avx2.c PROPERTIES
    COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  set_source_files_properties(${CMAKE_SOURCE_DIR}/src/cpu/ukr_avx512.c PROPERTIES
    COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx512vnni;-mavx512bf16;-mavx2;-mfma;-mf16c")
  list(APPEND GQMM_DEFINES GQMM_CPU_X86)
else()
  list(REMOVE_ITEM GQMM_SOURCES ${CMAKE_SOURCE_DIR}/src/cpu/ukr_avx2.c
       ${CMAKE_SOURCE_DIR}/src/cpu/ukr_avx512.c)
endif()
