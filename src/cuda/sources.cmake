# The CUDA backend: kernels (.cu) and the backend glue, only when nvcc is
# found; the device-memory API (device_api.c) is always built and reports
# "no GPU backend" without CUDA.
list(APPEND GQMM_SOURCES ${CMAKE_SOURCE_DIR}/src/cuda/device_api.c)
if(GQMM_HAVE_CUDA)
  file(GLOB GQMM_CUDA_KERNELS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/src/cuda/*.cu)
  list(APPEND GQMM_SOURCES ${GQMM_CUDA_KERNELS} ${CMAKE_SOURCE_DIR}/src/cuda/backend_cuda.c)
  list(APPEND GQMM_DEFINES GQMM_HAVE_CUDA)
  list(APPEND GQMM_LINK_LIBS CUDA::cudart_static)
  # Resource report (registers, spills) in the build log; warnings as errors.
  string(APPEND CMAKE_CUDA_FLAGS " -Xptxas=-v -Werror=all-warnings")
endif()
# The MoE expert layer on the GPU (hook registered by backend_cuda.c).
if(GQMM_HAVE_CUDA)
  list(APPEND GQMM_SOURCES ${CMAKE_SOURCE_DIR}/src/cuda/moe_cuda.c)
endif()
