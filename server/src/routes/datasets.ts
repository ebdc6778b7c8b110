import type { Routes } from '../http.js';

export const datasetRoutes: Routes = {};
